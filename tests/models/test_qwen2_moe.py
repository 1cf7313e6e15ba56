"""Qwen2-MoE specifics (its HF parity — whole prompt, chunks, greedy decode — runs in
test_hf_parity.py with the other families, configs `qwen2_moe*` in hf_reference.py).

Here: sparse and dense layers follow `decoder_sparse_step` / `mlp_only_layers`, and one sparse
block is built per fake TP rank (TP 2, with and without EP 2): the ranks' partial outputs, routed
plus shared, meet in exactly one all-reduce per block and sum to Hugging Face's block output, also
when all-to-all dispatch is configured but a CUDA graph is being captured (static-shape
all-reduce path only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from hf_reference import save_checkpoint, tiny_configs
from shardserve.parallel import expert as expert_module
from shardserve.parallel import linear as linear_module
from shardserve.parallel.state import GroupInfo, ParallelState, get_parallel_state, set_parallel_state
from shardserve.workers.config import ModelConfig
from shardserve.workers.models import moe as moe_module
from shardserve.workers.models.loader import LoadedModel, load_model
from shardserve.workers.models.moe import SparseMoeBlock
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

ATOL = 1e-4
CONFIGS = {name: config for name, config in tiny_configs().items() if name.startswith("qwen2_moe")}


@dataclass
class Pair:
    ours: LoadedModel
    hf: torch.nn.Module


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_checkpoint(CONFIGS[request.param], folder, seed=3)
    ours = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"), torch.device("cpu"),
                      torch.float32)
    assert type(ours.model).__name__ == "Qwen2MoeForCausalLM"
    assert ours.model.missing_parameters() == []
    return Pair(ours, hf)


def test_layer_kinds_follow_config(pair: Pair) -> None:
    config = pair.ours.model.config
    for i, layer in enumerate(pair.ours.model.model.layers):
        sparse = i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0
        assert isinstance(layer.mlp, SparseMoeBlock) == sparse
        if sparse:
            assert layer.mlp.shared_expert is not None and layer.mlp.renormalize == config.norm_topk_prob
            assert layer.mlp.syncs_in_forward  # CPU: the expert loop (not graph-capturable)


@contextmanager
def _fake_rank(rank: int, tp: int, ep: int, dispatch: str) -> Iterator[None]:
    """This process acts as TP rank `rank` (EP rank rank // (tp / ep)); placeholder groups, no collectives."""
    previous = get_parallel_state()
    set_parallel_state(ParallelState(tp=GroupInfo(rank=rank, size=tp, group=object()),
                                     ep=GroupInfo(rank=rank // (tp // ep), size=ep, group=object() if ep > 1 else None),
                                     expert_dispatch=dispatch))
    try:
        yield
    finally:
        set_parallel_state(previous)


def _load_block(config: Qwen2MoeConfig, hf_block: torch.nn.Module) -> SparseMoeBlock:
    """Our block as the current (fake) rank holds it, loaded from the HF block's tensors."""
    block = SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                           config.moe_intermediate_size, renormalize=config.norm_topk_prob, dtype=torch.float32,
                           shared_intermediate_size=config.shared_expert_intermediate_size)
    ours = dict(block.named_parameters())
    targets = {"experts.gate_up_proj": ("experts.w13_weight", (None, "gate_up")),
               "experts.down_proj": ("experts.w2_weight", (None, "down")),
               "shared_expert.gate_proj.weight": ("shared_expert.gate_up_proj.weight", 0),
               "shared_expert.up_proj.weight": ("shared_expert.gate_up_proj.weight", 1)}
    for name, weight in hf_block.state_dict().items():
        target, shard_id = targets.get(name, (name, None))
        param = ours[target]
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            param.data.copy_(weight)
        else:
            loader(param, weight, shard_id)
    return block


def _hf_block(config: Qwen2MoeConfig, seed: int) -> Qwen2MoeSparseMoeBlock:
    """HF's block with every parameter drawn from `seed`: a bare block is not initialised (its
    fused expert weights are `torch.empty`, i.e. whatever memory it gets: NaN at times)."""
    torch.manual_seed(seed)
    hf_block = Qwen2MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in hf_block.parameters():
            param.normal_(0.0, 0.2)
    return hf_block


@pytest.mark.parametrize("ep,dispatch,capturing", [(1, "all_reduce", False), (2, "all_reduce", False),
                                                    (2, "all_to_all", True)])
def test_tp_partials_meet_in_one_all_reduce(monkeypatch: pytest.MonkeyPatch, ep: int, dispatch: str,
                                            capturing: bool) -> None:
    """TP 2 ranks' outputs sum to HF's; under CUDA-graph capture all-to-all dispatch falls back to all-reduce."""
    tp = 2
    config = CONFIGS["qwen2_moe"]
    hf_block = _hf_block(config, seed=5)
    x = torch.randn(7, config.hidden_size)
    with torch.no_grad():
        want = hf_block(x[None])[0]

    reduces: list[int] = []

    def fake_reduce(t: torch.Tensor) -> torch.Tensor:  # identity per rank; the test sums the ranks
        reduces.append(t.shape[0])
        return t

    def no_reduce(*args: object) -> torch.Tensor:
        raise AssertionError("only the block's single all-reduce may run")

    monkeypatch.setattr(expert_module, "tensor_model_parallel_all_reduce", fake_reduce)
    monkeypatch.setattr(moe_module, "tensor_model_parallel_all_reduce", fake_reduce)  # the block's forward sums
    monkeypatch.setattr(linear_module, "tensor_model_parallel_all_reduce", no_reduce)
    monkeypatch.setattr(expert_module, "capturing_graph", lambda x: capturing)
    monkeypatch.setattr(expert_module, "_all_to_all", no_reduce)  # static shapes only (all-reduce path)
    partials = []
    for rank in range(tp):
        with _fake_rank(rank, tp, ep, dispatch), torch.no_grad():
            partials.append(_load_block(config, hf_block)(x))
    assert reduces == [7] * tp  # one all-reduce per block forward on each rank
    torch.testing.assert_close(sum(partials), want, atol=1e-5, rtol=1e-5)


def test_forward_unreduced_leaves_the_sum_to_the_caller_on_the_all_reduce_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder layer fuses the block's all-reduce into the next RMSNorm: `forward_unreduced`
    must hand back this rank's partial sum and say so (all-reduce path), or a complete output
    and say that (all-to-all path), and run no all-reduce itself on the all-reduce path."""
    config = CONFIGS["qwen2_moe"]
    hf_block = _hf_block(config, seed=6)
    x = torch.randn(7, config.hidden_size)

    def no_reduce(*args: object) -> torch.Tensor:
        raise AssertionError("forward_unreduced must leave the all-reduce to its caller")

    monkeypatch.setattr(expert_module, "tensor_model_parallel_all_reduce", no_reduce)
    monkeypatch.setattr(moe_module, "tensor_model_parallel_all_reduce", no_reduce)
    monkeypatch.setattr(linear_module, "tensor_model_parallel_all_reduce", no_reduce)
    partials = []
    for rank in range(2):
        with _fake_rank(rank, 2, 1, "all_reduce"), torch.no_grad():
            out, is_partial = _load_block(config, hf_block).forward_unreduced(x)
        assert is_partial
        partials.append(out)
    with torch.no_grad():
        torch.testing.assert_close(sum(partials), hf_block(x[None])[0], atol=1e-5, rtol=1e-5)

    complete = torch.full((7, config.hidden_size), 3.0)
    monkeypatch.setattr(expert_module, "_all_to_all", lambda *args: complete)
    monkeypatch.setattr(expert_module, "tensor_model_parallel_all_reduce", lambda t: t)  # the shared expert's sum
    with _fake_rank(0, 2, 2, "all_to_all"), torch.no_grad():
        out, is_partial = _load_block(config, hf_block).forward_unreduced(x)
    assert not is_partial and out.shape == complete.shape
