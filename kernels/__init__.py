"""Triton kernels that compute with the packed quantized weights."""
from kernels.lut_matmul import lut_matmul, reference_lut_matmul

__all__ = ["lut_matmul", "reference_lut_matmul"]
