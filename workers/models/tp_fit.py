"""Whether a model's attention heads split over a tensor-parallel size, checked in the driver.

The engine calls `check_tensor_parallel(hf_config, tp)` from the model's header (no weights)
before any rank starts, so `LLM(..., tensor_parallel_size=2)` on SmolLM2 (9 heads) fails at once
with the setting's name and the sizes that fit, instead of a rank's traceback after start-up.
The rules are parallel/linear.py's QKVParallelLinear: query heads divide evenly; KV heads divide
evenly, or (tp above their count) each is replicated on tp / num_kv_heads ranks.
"""

from __future__ import annotations

from typing import Any


def fits(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    if num_heads % tp:
        return False
    return tp % num_kv_heads == 0 if tp >= num_kv_heads else num_kv_heads % tp == 0


def check_tensor_parallel(hf_config: Any, tp: int) -> None:
    """Raise ValueError naming `tensor_parallel_size` when the model's heads do not split over `tp`."""
    num_heads = getattr(hf_config, "num_attention_heads", None)
    if tp <= 1 or not isinstance(num_heads, int):
        return
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    if not fits(num_heads, num_kv_heads, tp):
        sizes = [size for size in range(1, num_heads + 1) if fits(num_heads, num_kv_heads, size)]
        raise ValueError(f"tensor_parallel_size {tp} does not split the model's {num_heads} attention heads "
                         f"({num_kv_heads} KV heads); sizes that do: {', '.join(map(str, sizes))}")
