"""Speculative decoding: proposers of draft tokens (suffix.py: SuffixDecoding over earlier outputs)."""
