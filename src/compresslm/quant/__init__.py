"""Quantization: grids and primitives, and the algorithms (RTN, GPTQ) as pure tensor functions."""
