"""Rotary frequencies and rope-parameter parsing against transformers' own rotary embedding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from shardserve.workers.models.layers import rope_inv_freq, rope_parameters
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

ROPES = [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
]


@pytest.mark.parametrize("rope", ROPES, ids=[r["rope_type"] for r in ROPES])
def test_inv_freq_matches_transformers(rope: dict) -> None:
    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                         rope_parameters=dict(rope))
    ours = rope_inv_freq(128, rope_parameters(config))
    torch.testing.assert_close(ours, LlamaRotaryEmbedding(config).inv_freq.float(), atol=0, rtol=1e-6)


def test_old_style_rope_scaling_is_read() -> None:
    old = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    params = rope_parameters(old)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 500000.0 and params["factor"] == 2.0
    assert rope_parameters(SimpleNamespace(rope_theta=1e6, rope_scaling=None)) == {"rope_theta": 1e6,
                                                                                  "rope_type": "default"}


def test_unsupported_rope_type_names_it() -> None:
    with pytest.raises(NotImplementedError, match="'dynamic'"):
        rope_inv_freq(64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
