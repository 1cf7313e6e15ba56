"""Speculative decoding: the Speculator the scheduler asks for drafts (speculator.py) and its
proposers (proposer.py: the interface; ngram.py: prompt lookup; suffix.py: SuffixDecoding over
earlier requests' outputs and the request's own tokens)."""
