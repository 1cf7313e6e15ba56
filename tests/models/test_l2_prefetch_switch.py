"""The L2 prefetch switch (workers/models/l2_prefetch.py) and its place in LlamaAttention.forward.

No GPU here: the tests check when a prefetcher is made (never with the switch off, never off
CUDA), the env parsing, the stream calls a prefetcher makes (with stand-in streams), and that the
attention layer forks after the qkv matmul and joins after o_proj.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hf_reference import tiny_configs
from paged_helper import PagedBatch
from shardserve.parallel.linear import RowParallelLinear
from shardserve.workers.models import l2_prefetch as l2
from shardserve.workers.models.llama import LlamaForCausalLM
from torch import nn


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (l2.ENV_ENABLE, l2.ENV_MAX_MB, l2.ENV_PROGRAMS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(l2, "_PREFETCHERS", {})
    monkeypatch.setattr(l2, "_WARNED", set())


@pytest.fixture
def no_cuda_streams(monkeypatch):
    """Any attempt to make a CUDA stream fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA stream was created")

    monkeypatch.setattr(torch.cuda, "Stream", refuse)


def test_off_by_default_creates_nothing(no_cuda_streams):
    assert not l2.enabled_by_env()
    linear = RowParallelLinear(64, 32, bias=False, params_dtype=torch.bfloat16)
    assert l2.prefetcher_for(linear) is None
    assert l2.skip_reason(linear) == f"{l2.ENV_ENABLE} is off"


@pytest.mark.parametrize("value", ["0", "", "false", "no", "off"])
def test_off_values(monkeypatch, value):
    monkeypatch.setenv(l2.ENV_ENABLE, value)
    assert not l2.enabled_by_env()


def test_on_but_not_cuda_is_skipped(monkeypatch, no_cuda_streams):
    monkeypatch.setenv(l2.ENV_ENABLE, "1")
    assert l2.enabled_by_env()
    linear = RowParallelLinear(64, 32, bias=False, params_dtype=torch.bfloat16)
    assert l2.prefetcher_for(linear) is None
    assert l2.skip_reason(linear) == "weight on cpu, not CUDA"


def test_only_plain_floating_point_weights(monkeypatch):
    monkeypatch.setenv(l2.ENV_ENABLE, "1")

    class Quantized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant_method = object()  # any LinearMethod but the unquantized one
            self.weight = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    assert l2.skip_reason(Quantized()) == "quantized (object)"
    assert l2.skip_reason(Packed()) == "no floating-point weight Parameter"
    assert l2.skip_reason(nn.Identity()) == "no floating-point weight Parameter"


def test_env_values(monkeypatch, caplog):
    assert l2.max_bytes_from_env() is None and l2.num_programs_from_env() == l2.DEFAULT_PROGRAMS
    monkeypatch.setenv(l2.ENV_MAX_MB, "24")
    assert l2.max_bytes_from_env() == 24 * 2**20
    monkeypatch.setenv(l2.ENV_MAX_MB, "0.5")
    assert l2.max_bytes_from_env() == 2**19
    monkeypatch.setenv(l2.ENV_PROGRAMS, "64")
    assert l2.num_programs_from_env() == 64
    with caplog.at_level(logging.WARNING, logger=l2.__name__):
        for _ in range(3):  # one warning per bad value, not one per layer
            monkeypatch.setenv(l2.ENV_MAX_MB, "lots")
            assert l2.max_bytes_from_env() is None
            monkeypatch.setenv(l2.ENV_MAX_MB, "-1")
            assert l2.max_bytes_from_env() is None
            monkeypatch.setenv(l2.ENV_PROGRAMS, "0")
            assert l2.num_programs_from_env() == l2.DEFAULT_PROGRAMS
    assert len(caplog.records) == 3


class FakeStream:
    """Stands in for torch.cuda.Stream: records wait_stream calls into a shared log."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_prefetcher_forks_launches_on_the_side_stream_and_joins(monkeypatch):
    from shardserve.workers.kernels import l2_prefetch as kernels

    log: list = []
    current = [FakeStream("main", log)]
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])

    class StreamContext:
        def __init__(self, stream: FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            self.saved, current[0] = current[0], self.stream

        def __exit__(self, *exc) -> None:
            current[0] = self.saved

    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(kernels, "sink_for", lambda device: log.append(f"sink on {device}"))
    monkeypatch.setattr(kernels, "prefetch_to_l2", lambda t, max_bytes, num_programs: log.append(
        f"launch on {current[0].name}: {tuple(t.shape)}, {max_bytes}, {num_programs}"))

    prefetcher = l2.L2Prefetcher(torch.device("cuda", 0), 1 << 20, 16)
    weight = torch.zeros(8, 4)
    prefetcher.prefetch(weight)
    prefetcher.join()
    assert log == ["sink on cuda:0",  # allocated when built, before any capture
                   "side waits for main", "launch on side: (8, 4), 1048576, 16", "main waits for side"]
    assert current[0].name == "main"


class Recorder:
    """A prefetcher that records its calls, between the layer's own matmul calls."""

    def __init__(self, log: list) -> None:
        self.log = log

    def prefetch(self, weight: torch.Tensor) -> None:
        self.log.append(("prefetch", weight))

    def join(self) -> None:
        self.log.append(("join", None))


def test_attention_forks_after_qkv_and_joins_after_o_proj(monkeypatch, caplog, no_cuda_streams):
    monkeypatch.setenv(l2.ENV_ENABLE, "1")
    with caplog.at_level(logging.INFO, logger=l2.__name__):
        model = LlamaForCausalLM(tiny_configs()["llama3_rope"]).eval()
    layers = model.model.own_layers
    assert all(layer.self_attn.o_prefetch is None for layer in layers)  # CPU: switched on, still nothing
    assert [r.getMessage() for r in caplog.records] == [
        f"L2 prefetch of o_proj.weight skipped in {len(layers)} layers: weight on cpu, not CUDA"]

    log: list = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        attn.o_prefetch = Recorder(log)
        attn.qkv_proj.register_forward_hook(lambda *_, i=i: log.append(("qkv", i)))
        attn.o_proj.register_forward_hook(lambda *_, i=i: log.append(("o_proj", i)))
    backend = layers[0].self_attn.backend
    real_forward = backend.forward

    def attention(*args, **kwargs):
        log.append(("attention", None))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(backend, "forward", attention)
    with torch.no_grad():
        PagedBatch(model).step([("a", [1, 2, 3])])
    expected = []
    for i, layer in enumerate(layers):
        expected += [("qkv", i), ("prefetch", layer.self_attn.o_proj.weight), ("attention", None), ("o_proj", i),
                     ("join", None)]
    assert len(log) == len(expected)
    for got, want in zip(log, expected, strict=True):
        same = got[1] is want[1] if isinstance(want[1], torch.Tensor) else got[1] == want[1]
        assert got[0] == want[0] and same, (got, want)  # the weight prefetched is o_proj's own


def test_switch_off_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger=l2.__name__):
        model = LlamaForCausalLM(tiny_configs()["llama_tied"])
    assert not caplog.records
    assert all(layer.self_attn.o_prefetch is None for layer in model.model.own_layers)
