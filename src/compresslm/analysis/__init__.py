"""Diagnostics of compressed models: mask stability, and later compressibility and robustness."""
