"""The process-group layout and every collective of parallel/comm.py on 4 real gloo ranks.

One spawn of TP 2 x PP 2 (EP 2 inside each stage) runs all the collectives; each rank reports
what it saw and the test checks it against values computed here. Layout, layer partition and
expert placement are also checked as plain functions.
"""

from __future__ import annotations

import pytest
import torch
from parallel_helpers import spawn_ranks
from shardserve.parallel import comm
from shardserve.parallel.expert import ExpertPlacement
from shardserve.parallel.pipeline import partition_layers
from shardserve.parallel.state import ParallelState, group_layout, validate_sizes


def test_group_layout_tp_major_within_stage() -> None:
    layout = group_layout(8, tp=4, pp=2, ep=2)
    assert layout["tp"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert layout["pp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    # moe_tp = 2: EP groups pair ranks holding the same slice of the expert features
    assert layout["ep"] == [(0, 2), (1, 3), (4, 6), (5, 7)]


def test_invalid_sizes_name_the_value() -> None:
    with pytest.raises(ValueError, match="world_size 3"):
        validate_sizes(3, 2, 2, 1)
    with pytest.raises(ValueError, match="expert_parallel_size 3 must divide tensor_parallel_size 2"):
        validate_sizes(2, 2, 1, 3)


def test_layer_partition_even_and_configured() -> None:
    assert partition_layers(7, 3) == [3, 2, 2]
    assert partition_layers(4, 2, (1, 3)) == [1, 3]
    with pytest.raises(ValueError, match="summing to num_hidden_layers = 4"):
        partition_layers(4, 2, (2, 3))


def test_expert_placement_uneven() -> None:
    placements = [ExpertPlacement(7, 3, r) for r in range(3)]
    assert [(p.start, p.num_local) for p in placements] == [(0, 3), (3, 2), (5, 2)]
    owners = placements[0].owner_of(torch.arange(7))
    assert owners.tolist() == [0, 0, 0, 1, 1, 2, 2]


def _collectives(state: ParallelState) -> dict:
    rank = state.rank
    out: dict = {"tp": (state.tp_rank, state.tp_size), "pp": (state.pp_rank, state.pp_size),
                 "ep": (state.ep_rank, state.ep_size)}
    out["all_reduce"] = comm.tensor_model_parallel_all_reduce(torch.full((2,), float(rank + 1))).tolist()
    out["all_gather"] = comm.tensor_model_parallel_all_gather(torch.tensor([[rank, rank + 10]]), dim=-1).tolist()
    if state.is_first_pp_rank:
        comm.send_to_next_stage(torch.arange(3, dtype=torch.float32) + 100 * rank)
    else:
        out["recv"] = comm.recv_from_prev_stage((3,), torch.float32, torch.device("cpu")).tolist()
    out["broadcast"] = comm.broadcast_object({"step": 7, "from": rank} if rank == 0 else None, src=0)
    out["min"] = comm.cpu_all_reduce_min(10 + rank)
    # EP all-to-all: rank sends (r + 1) rows to each peer r, each row tagged with (sender, receiver).
    send_counts = [r + 1 for r in range(state.ep_size)]
    rows = torch.tensor([[state.ep_rank, r] for r in range(state.ep_size) for _ in range(r + 1)])
    recv_counts = comm.expert_exchange_counts(torch.tensor(send_counts)).tolist()
    out["a2a_counts"] = recv_counts
    out["a2a"] = comm.expert_all_to_all(rows, send_counts, recv_counts).tolist()
    out["ep_gather"] = comm.expert_all_gather(torch.full((state.ep_rank + 1, 2), state.ep_rank), [1, 2]).tolist()
    return out


def test_collectives_on_four_gloo_ranks() -> None:
    results = spawn_ranks(_collectives, world_size=4, tp=2, pp=2, ep=2)
    for rank, got in enumerate(results):
        stage, tp_rank = divmod(rank, 2)
        assert got["tp"] == (tp_rank, 2) and got["pp"] == (stage, 2) and got["ep"] == (tp_rank, 2)
        peers = [stage * 2, stage * 2 + 1]
        assert got["all_reduce"] == [float(sum(p + 1 for p in peers))] * 2
        assert got["all_gather"] == [[peers[0], peers[0] + 10, peers[1], peers[1] + 10]]
        if stage == 1:
            assert got["recv"] == [100.0 * tp_rank + i for i in range(3)]  # from rank tp_rank of stage 0
        assert got["broadcast"] == {"step": 7, "from": 0}
        assert got["min"] == 10
        assert got["a2a_counts"] == [tp_rank + 1, tp_rank + 1]
        assert got["a2a"] == [[s, tp_rank] for s in range(2) for _ in range(tp_rank + 1)]
        assert got["ep_gather"] == [[0, 0], [1, 1], [1, 1]]
