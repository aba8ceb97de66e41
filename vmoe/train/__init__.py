"""vmoe.train"""
