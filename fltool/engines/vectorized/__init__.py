"""engines/vectorized"""
