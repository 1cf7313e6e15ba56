"""Checkpoint layouts of quantized weights: GPTQ, AWQ, compressed-tensors (see layout.py)."""
