"""A tensor-parallel size that does not split the model's heads is refused in the driver, before any rank
starts (workers/models/tp_fit.py), naming the setting and the sizes that fit."""

from __future__ import annotations

import pytest
from shardserve.workers.models.tp_fit import fits
from transformers import LlamaConfig


@pytest.mark.parametrize("heads, kv_heads, tp, ok", [
    (32, 8, 4, True), (32, 8, 16, True),  # KV heads replicated on 2 ranks each
    (9, 3, 3, True), (9, 3, 2, False), (32, 8, 3, False), (12, 8, 4, True), (12, 8, 6, False)])
def test_fits_follows_qkv_parallel_linear(heads: int, kv_heads: int, tp: int, ok: bool) -> None:
    assert fits(heads, kv_heads, tp) is ok


def test_smollm2_at_tp2_is_refused_before_the_ranks_start() -> None:
    from shardserve.workers.llm import LLM

    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not split the model's 9 attention heads "
                                         r"\(3 KV heads\); sizes that do: 1, 3, 9"):
        LLM("default", tensor_parallel_size=2, device="cpu")  # before: a rank's traceback, "worker rank 1 died"


def test_configs_without_heads_pass() -> None:
    from shardserve.workers.models.tp_fit import check_tensor_parallel

    check_tensor_parallel(object(), 4)
    check_tensor_parallel(LlamaConfig(num_attention_heads=32, num_key_value_heads=8), 8)
