"""Quantization algorithms: float weight (+ calibration inputs) -> the unpacked forms of ../weights.py."""
