"""GGUF projections kept packed: Q4_0, Q4_1, Q8_0 and the k-quants Q4_K, Q6_K read into grouped layouts.

gguf-py's `GGUFReader` (the llama.cpp project's own reader, which transformers also uses)
memory-maps the file. Each decoder projection (`blk.N.attn_q` ... `ffn_down`) is split into its
block fields — 32 weights per block with an fp16 scale d (and, for Q4_1, an fp16 minimum m):
Q4_1 w = q * d + m, Q4_0 w = (q - 8) * d, Q8_0 w = q * d with signed q (stored + 128 here) — and
yielded as three tensors `<hf name>.q` (uint8 [N, K]), `.scales`, `.mins` (float32 [N, K / 32]),
which `GgufLayout` loads like any checkpoint layout (sliced by rank) and unpacks into a
GroupedWeight. A file whose projections are all Q4_K / Q6_K (llama.cpp's Q4_K_M, Q6_K) goes through
gguf_kquant.py instead: 256-weight super-blocks, exact fp32 sub-block scales, per-row block types (a
merged layer may mix them). Llama's q/k rows, permuted by llama.cpp's converter, are put back in
Hugging Face order (a row permutation of every field). Every other tensor (norms, embedding) is
dequantized with gguf-py's `dequantize`, except those the model holds packed already (`skip`: on CPU,
workers/models/gguf_tables.py keeps token_embd / output in their blocks). Files whose projections use other block types (Q5_0, Q2_K,
Q3_K, Q5_K — so Q4_K_S, which has Q5_K tensors — or Q4_1 mixed with Q8_0) take the dequantized path
(workers/models/gguf.py); `unpacked_reason` names the tensor that sent them there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shardserve.workers.quant.formats.layout import TensorSpec, ceil_div
from shardserve.workers.quant.weights import GroupedWeight, QuantizedWeight

BLOCK = 32
PACKED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # block type -> bits (gguf-py is imported only to read a file)
_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
_OTHER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


class GgufLayout:
    """The block fields of one projection: q uint8 [N, K], scales / mins float32 [N, K / 32]."""

    def __init__(self, bits: int, block_type: str) -> None:
        self.name = f"gguf {block_type}"
        self.bits = bits

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        groups = ceil_div(input_size, BLOCK)
        return {"q": TensorSpec((output_size, input_size), torch.uint8, 1, 0),
                "scales": TensorSpec((output_size, groups), torch.float32, 1, 0, input_pack=BLOCK),
                "mins": TensorSpec((output_size, groups), torch.float32, 1, 0, input_pack=BLOCK)}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        return GroupedWeight(q=tensors["q"], scales=tensors["scales"], mins=tensors["mins"], group_size=BLOCK,
                             bits=self.bits)

    def pack(self, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        raise NotImplementedError("writing GGUF files is llama.cpp's job (convert_hf_to_gguf.py)")


def projection_types(path: Path) -> dict[str, str]:
    """{GGUF tensor name: block type} of the file's decoder projections."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors
            if (m := _BLOCK_NAME.match(t.name)) and m.group(2) in _PROJ}


def projection_block_type(path: Path) -> str | None:
    """How the file's projections are kept packed: the one type they all use (e.g. 'Q4_1'), or the
    k-quants they mix ('Q4_K', 'Q6_K' or 'Q4_K+Q6_K'); None where some projection cannot be
    (`unpacked_reason` says which)."""
    from shardserve.workers.quant.formats.gguf_kblocks import KQUANT_BITS

    types = set(projection_types(path).values())
    if len(types) == 1 and next(iter(types)) in PACKED:
        return next(iter(types))
    if types and types <= set(KQUANT_BITS):
        return "+".join(sorted(types))
    return None


def unpacked_reason(path: Path) -> str:
    """Why `projection_block_type` found no packed form: the first projection that breaks the rule."""
    from shardserve.workers.quant.formats.gguf_kblocks import KQUANT_BITS

    types = projection_types(path)
    if not types:
        return f"{path.name} has no decoder projections (blk.N.attn_q ... ffn_down)"
    kquant = [name for name, t in types.items() if t in KQUANT_BITS]
    for name, block in types.items():
        if block not in PACKED and block not in KQUANT_BITS:
            return (f"GGUF tensor {name} is {block}: kept packed are {', '.join(PACKED)} (one type in every "
                    f"projection) or {' and '.join(KQUANT_BITS)} (mixed); other types take the dequantized path")
        if kquant and block not in KQUANT_BITS:
            return (f"GGUF tensor {name} is {block} while {kquant[0]} is {types[kquant[0]]}: k-quants are kept "
                    f"packed only when every projection is {' or '.join(KQUANT_BITS)}")
    first = next(iter(types))
    other = next(name for name, t in types.items() if t != types[first])
    return (f"GGUF tensors {first} ({types[first]}) and {other} ({types[other]}) mix block types: "
            f"{', '.join(PACKED)} are kept packed only when every projection uses the same one")


def split_blocks(raw: np.ndarray, block_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw block bytes [N, groups * block_bytes] -> (q uint8 [N, K], scales, mins float32 [N, groups])."""
    n = raw.shape[0]
    if block_type == "Q8_0":  # d fp16, 32 x int8
        blocks = raw.reshape(n, -1, 34)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
        return (torch.from_numpy(q.reshape(n, -1).astype(np.uint8)), torch.from_numpy(d),
                torch.from_numpy(-128 * d))
    with_min = block_type == "Q4_1"  # Q4_1: d, m fp16, 16 bytes; Q4_0: d fp16, 16 bytes
    blocks = raw.reshape(n, -1, 20 if with_min else 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if with_min else -8 * d
    qs = blocks[..., 4:] if with_min else blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # low nibbles: weights 0..15, high: 16..31
    return torch.from_numpy(q.reshape(n, -1).copy()), torch.from_numpy(d), torch.from_numpy(m)


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (rows of `n_head` heads)."""
    rows = torch.arange(n_rows)
    return rows.reshape(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


def read_gguf_packed(path: Path, config: Any, dtype: torch.dtype,
                     skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face-named tensors: packed projection fields and `dtype` for everything else, but
    the GGUF tensors named in `skip` (an embedding / LM head the model already holds packed)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
    from shardserve.workers.quant.formats.gguf_kblocks import split_kquant

    reader = GGUFReader(str(path))
    for tensor in reader.tensors:
        if tensor.name in skip:
            continue
        match = _BLOCK_NAME.match(tensor.name)
        raw = np.asarray(tensor.data)
        if match is not None and match.group(2) in _PROJ:
            block = tensor.tensor_type.name
            if block in PACKED:
                fields = dict(zip(("q", "scales", "mins"), split_blocks(raw, block), strict=True))
            else:
                try:
                    fields = split_kquant(raw, block)  # raises for a type kept neither way
                except ValueError as exc:
                    raise ValueError(f"GGUF tensor {tensor.name!r} cannot be kept packed: {exc}") from exc
            name = f"model.layers.{match.group(1)}.{_PROJ[match.group(2)]}"
            if match.group(2) in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if match.group(2) == "attn_q" else config.num_key_value_heads
                order = unpermute_rows(raw.shape[0], heads)
                fields = {key: value[order] for key, value in fields.items()}
            for key, value in fields.items():
                yield f"{name}.{key}", value
            continue
        if match is not None:
            if match.group(2) not in _OTHER:
                raise ValueError(f"GGUF tensor {tensor.name!r} has no place in the model")
            hf_name = f"model.layers.{match.group(1)}.{_OTHER[match.group(2)]}.weight"
        elif tensor.name in _GLOBAL:
            hf_name = _GLOBAL[tensor.name]
        else:
            continue  # e.g. rope_freqs: recomputed from the config
        values = raw if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) \
            else dequantize(raw, tensor.tensor_type)
        yield hf_name, torch.from_numpy(np.array(values)).to(dtype)  # a copy: the file is mapped read-only
