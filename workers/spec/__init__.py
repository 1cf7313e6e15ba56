"""Speculative decoding: the Speculator the scheduler asks for drafts (speculator.py) and its
proposers (proposer.py: the interface; ngram.py: prompt lookup; suffix.py: SuffixDecoding over
earlier requests' outputs and the request's own tokens; draft.py: a draft model run greedily by a
nested engine of our own — a smaller model, or a quantized or layer-truncated copy of the target)."""
