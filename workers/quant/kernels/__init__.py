"""Triton kernels of the quantized linear methods (CUDA; tests run them under Triton's interpreter)."""
