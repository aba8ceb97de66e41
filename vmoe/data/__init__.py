"""vmoe.data"""
