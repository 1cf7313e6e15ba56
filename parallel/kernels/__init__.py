"""Triton kernels the parallel layers call (GEMV of linear layers, fused all-reduce + RMSNorm), with PDL."""
