"""vmoe.viz"""
