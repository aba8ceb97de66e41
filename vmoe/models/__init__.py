"""vmoe.models"""
