"""LLM(...) keyword options land in the right EngineConfig section; unknown ones are refused."""

from __future__ import annotations

import pytest
from shardserve.workers.config import EngineConfig
from shardserve.workers.llm import _apply_overrides


def test_options_reach_their_sections():
    config = _apply_overrides(
        EngineConfig(),
        {"dtype": "float32", "num_blocks": 64, "mode": "static", "tensor_parallel_size": 2, "launcher": "ray"},
    )
    assert config.model.dtype == "float32"
    assert config.cache.num_blocks == 64
    assert config.scheduler.mode == "static"
    assert config.parallel.tensor_parallel_size == 2 and config.parallel.launcher == "ray"
    assert config.parallel.world_size == 2


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="unknown LLM option 'tensor_parallel'"):
        _apply_overrides(EngineConfig(), {"tensor_parallel": 2})


def test_bad_value_is_validated_by_its_section():
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        _apply_overrides(EngineConfig(), {"max_num_seqs": 0})
