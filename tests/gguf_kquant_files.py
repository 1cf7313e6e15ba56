"""Tiny GGUF Llamas with k-quant projections, written by gguf-py's GGUFWriter for the k-quant tests.

gguf-py cannot quantize Q4_K / Q6_K, so the blocks are random but valid: random bytes for the codes
and sub-block scales, a finite fp16 d (and dmin) sized so weights have a std of a few hundredths.
The reference is gguf-py's own `dequantize` of the same bytes. The tokenizer and the Llama keys are
copied from the embedded SmolLM2 file, its vocabulary cut to 4096 tokens (the model shape is
overridden: hidden 256, 2 layers).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from shardserve.workers.models.loader import default_model_path

BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
MIXED = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",  # Q4_K_M-like
         "ffn_up": "Q4_K", "ffn_down": "Q6_K", "blk.1.attn_v": "Q4_K", "blk.1.ffn_down": "Q4_K", "output": "Q6_K"}
VOCAB = 4096  # SmolLM2's first 4096 tokens and the merges among them: parsing 49k tokens costs seconds a read


def random_blocks(block: str, n: int, k: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Raw rows [n, k / 256 * bytes] of valid `block` super-blocks (weights of std ~0.05 * scale)."""
    raw = rng.integers(0, 256, (n, k // 256, BYTES[block]), dtype=np.uint8)

    def fp16(mean: float) -> np.ndarray:
        return (mean * scale * rng.uniform(0.5, 1.5, (n, k // 256, 1))).astype(np.float16).view(np.uint8)

    if block in ("Q4_K", "Q5_K"):
        raw[..., 0:2], raw[..., 2:4] = fp16(3e-4), fp16(2.2e-3)  # dmin ~ 7.5 d: weights centred near 0
    else:
        raw[..., 208:210] = fp16(4e-5)
    return raw.reshape(n, -1)


@functools.cache
def _source_keys() -> dict[str, tuple[object, GGUFValueType, GGUFValueType | None]]:
    """SmolLM2's Llama and tokenizer keys, the vocabulary cut to VOCAB tokens: {key: (value, type, item type)}."""
    source = GGUFReader(str(default_model_path()))
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:VOCAB]
    known = set(tokens)
    merges = [m for m in source.fields["tokenizer.ggml.merges"].contents()
              if (parts := m.split(" ")) and all(p in known for p in parts) and "".join(parts) in known]
    trimmed = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges, "llama.vocab_size": VOCAB,
               "tokenizer.ggml.token_type": source.fields["tokenizer.ggml.token_type"].contents()[:VOCAB]}
    keys = {}
    for key, field in source.fields.items():
        if key.startswith(("tokenizer.", "llama.")) or key == "general.name":
            kind = field.types[0]
            sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
            keys[key] = (trimmed.get(key, field.contents()), kind, sub)
    return keys


def write_tiny_llama(path: Path, types: dict[str, str], seed: int = 0, tokenizer: bool = True) -> Path:
    """A 2-layer Llama GGUF whose projections use `types` ({'attn_q': 'Q4_K', ...}; a key
    'blk.1.attn_v' overrides one layer; 'token_embd' / 'output' give those tables' types: F16 and
    tied without them); without `tokenizer`, no tokenizer keys (a file only read as far as its
    tensor list)."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    shape = {"llama.embedding_length": HIDDEN, "llama.feed_forward_length": FFN, "llama.block_count": LAYERS,
             "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
             "llama.rope.dimension_count": HIDDEN // HEADS, "llama.context_length": 512}
    for key, (value, kind, sub) in _source_keys().items():
        if tokenizer or not key.startswith("tokenizer."):
            writer.add_key_value(key, shape.get(key, value), kind, sub)
    vocab = VOCAB
    if "token_embd" in types:  # e.g. Q6_K: a tied Q4_K_M table (no output.weight), or Q4_K: an untied one
        raw = random_blocks(types["token_embd"], vocab, HIDDEN, rng, scale=10.0)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=GGMLQuantizationType[types["token_embd"]])
    else:
        writer.add_tensor("token_embd.weight", (rng.standard_normal((vocab, HIDDEN)) * 0.5).astype(np.float16))
    writer.add_tensor("output_norm.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
    if "output" in types:  # an untied LM head (Q4_K_M: Q6_K)
        raw = random_blocks(types["output"], vocab, HIDDEN, rng, scale=16 / np.sqrt(HIDDEN))
        writer.add_tensor("output.weight", raw, raw_dtype=GGMLQuantizationType[types["output"]])
    dims = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // 2, HIDDEN), "attn_v": (HIDDEN // 2, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
            "ffn_down": (HIDDEN, FFN)}
    for layer in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
        for proj, (n, k) in dims.items():
            block = types.get(f"blk.{layer}.{proj}", types[proj])
            raw = random_blocks(block, n, k, rng, scale=16 / np.sqrt(k))
            writer.add_tensor(f"blk.{layer}.{proj}.weight", raw, raw_dtype=GGMLQuantizationType[block])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
