"""Writes tests/data/tiny_llama_q4_k_m.gguf (quantized by llama.cpp itself) and llama.cpp's logits for it.

Run once by hand (needs llama-cpp-python: `pip install -e .[bench]`): python tests/data/make_kquant_llama.py.
A tiny random Llama (hidden 256, intermediate 256, 4 heads, 1 KV head, 2 layers, untied LM head, vocabulary
SmolLM2's first 384 tokens and the merges among them) is written as F32 by gguf-py, quantized to Q4_K_M by
`llama_cpp.llama_model_quantize` (llama.cpp picks the mix: Q4_K, and Q6_K for the LM head and, on layer 1,
attn_v / ffn_down), and run by `llama_cpp.Llama` (1 thread, logits_all, F32 KV cache) on PROMPT; its float32
logits [len(PROMPT), vocab] go to tiny_llama_q4_k_m.json with the tensor types, and so do llama.cpp's logits
for a copy of the file dequantized to F32 by gguf-py (the same weights with float activations: llama.cpp
rounds activations to Q8_K for k-quant dot products, and this separates that rounding from the weights). tests/quant/test_gguf_llamacpp.py
checks our engine against them without llama.cpp.
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

HERE = Path(__file__).resolve().parent
OUT, REFERENCE = HERE / "tiny_llama_q4_k_m.gguf", HERE / "tiny_llama_q4_k_m.json"
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 256, 4, 1, 2, 384
PROMPT = [1, 300, 45, 270, 99, 311, 23, 301, 17, 380]


def source_keys() -> dict[str, tuple[object, GGUFValueType, GGUFValueType | None]]:
    """SmolLM2's Llama and tokenizer keys (its embedded GGUF), the vocabulary cut to VOCAB tokens."""
    sys.path.insert(0, str(HERE.parent.parent))
    from shardserve.workers.models.loader import default_model_path

    source = GGUFReader(str(default_model_path()))
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:VOCAB]
    known = set(tokens)
    merges = [m for m in source.fields["tokenizer.ggml.merges"].contents()
              if (parts := m.split(" ")) and all(p in known for p in parts) and "".join(parts) in known]
    trimmed = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges, "llama.vocab_size": VOCAB,
               "tokenizer.ggml.token_type": source.fields["tokenizer.ggml.token_type"].contents()[:VOCAB],
               "general.name": "tiny random llama", "llama.embedding_length": HIDDEN,
               "llama.feed_forward_length": FFN, "llama.block_count": LAYERS, "llama.attention.head_count": HEADS,
               "llama.attention.head_count_kv": KV_HEADS, "llama.rope.dimension_count": HIDDEN // HEADS,
               "llama.context_length": 256}
    keys = {}
    for key, field in source.fields.items():
        if key.startswith(("tokenizer.", "llama.")) or key == "general.name":
            kind = field.types[0]
            sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
            keys[key] = (trimmed.get(key, field.contents()), kind, sub)
    return keys


def write_f32(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    def normal(n: int, k: int, std: float) -> np.ndarray:
        return (rng.standard_normal((n, k)) * std).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    for key, (value, kind, sub) in source_keys().items():
        writer.add_key_value(key, value, kind, sub)
    writer.add_file_type(0)  # ALL_F32
    writer.add_tensor("token_embd.weight", normal(VOCAB, HIDDEN, 1.0))
    writer.add_tensor("output_norm.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
    writer.add_tensor("output.weight", normal(VOCAB, HIDDEN, 0.25))  # logits of std ~4: clear top-1s
    head = HIDDEN // HEADS
    dims = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head, HIDDEN), "attn_v": (KV_HEADS * head, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
            "ffn_down": (HIDDEN, FFN)}
    for layer in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
        for proj, (n, k) in dims.items():
            writer.add_tensor(f"blk.{layer}.{proj}.weight", normal(n, k, 1.0 / np.sqrt(k)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(source: Path, target: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def dequantized_copy(source: Path, target: Path) -> None:
    """The same file with every tensor dequantized to F32 by gguf-py (keys and tensor order kept)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(target), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.", "llama.")) or key == "general.name":
            kind = field.types[0]
            writer.add_key_value(key, field.contents(), kind, field.types[-1] if kind == GGUFValueType.ARRAY else None)
    writer.add_file_type(0)
    for tensor in reader.tensors:
        values = np.asarray(tensor.data)
        if tensor.tensor_type != GGMLQuantizationType.F32:
            values = dequantize(values, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llamacpp_logits(path: Path) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, n_threads_batch=1, logits_all=True,
                type_k=0, type_v=0, flash_attn=False, verbose=False)  # F32 KV cache (type 0): no fp16 rounding
    llm.eval(PROMPT)
    return np.array(llm.scores[: len(PROMPT)], dtype=np.float32)  # [len(PROMPT), vocab]


def _rounded(logits: np.ndarray) -> list[list[float]]:
    return [[float(f"{v:.6g}") for v in row] for row in logits]


def main() -> None:
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "tiny_llama_f32.gguf"
        write_f32(f32)
        quantize(f32, OUT)
        dequantized = Path(tmp) / "tiny_llama_dequantized.gguf"
        dequantized_copy(OUT, dequantized)
        float_logits = llamacpp_logits(dequantized)
    logits = llamacpp_logits(OUT)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(OUT)).tensors}
    REFERENCE.write_text(json.dumps({
        "llama_cpp_python": llama_cpp.__version__, "prompt": PROMPT, "tensor_types": types,
        "logits": _rounded(logits), "dequantized_logits": _rounded(float_logits)}) + "\n")
    print(f"{OUT.name}: {OUT.stat().st_size} bytes; {REFERENCE.name}: {REFERENCE.stat().st_size} bytes")


if __name__ == "__main__":
    main()
