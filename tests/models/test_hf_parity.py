"""Our models against Hugging Face transformers on tiny random checkpoints of every family.

Each checkpoint is saved with `save_pretrained` and loaded with `load_model`; logits are compared
in float32 for a whole prompt, the same prompt in two chunks over a paged cache with 4-token
blocks, greedy decoding one token per step (tokens equal to HF `generate`), and a mixed batch
where one request decodes while another prefills a chunk on top of a cached prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from hf_reference import save_checkpoint, tiny_configs
from paged_helper import PagedBatch
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.loader import LoadedModel, load_model

ATOL = 1e-4
CONFIGS = tiny_configs()


@dataclass
class Pair:
    ours: LoadedModel
    hf: torch.nn.Module


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    hf = save_checkpoint(CONFIGS[name], folder, seed=1, max_shard_size="40KB" if "sharded" in name else None)
    if "sharded" in name:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    ours = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"), torch.device("cpu"),
                      torch.float32)
    assert type(ours.model).__name__ == CONFIGS[name].architectures[0]
    return Pair(ours, hf)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [len, vocab]


def test_whole_prompt(pair: Pair) -> None:
    ids = _prompt(0, 13)
    batch = PagedBatch(pair.ours.model)
    (hidden,) = batch.step([("a", ids)])
    logits = pair.ours.model.compute_logits(hidden)
    assert logits.shape == (13, 256) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, _hf_logits(pair.hf, ids), atol=ATOL, rtol=0)


def test_two_chunks_read_prefix_from_paged_cache(pair: Pair) -> None:
    ids = _prompt(1, 14)
    batch = PagedBatch(pair.ours.model, block_size=4)
    (first,) = batch.step([("a", ids[:5])])
    (second,) = batch.step([("a", ids[5:])])
    logits = pair.ours.model.compute_logits(torch.cat([first, second]))
    torch.testing.assert_close(logits, _hf_logits(pair.hf, ids), atol=ATOL, rtol=0)


def test_greedy_decode_matches_generate(pair: Pair) -> None:
    ids = _prompt(2, 7)
    num_new = 8
    with torch.no_grad():
        expected = pair.hf.generate(torch.tensor([ids]), max_new_tokens=num_new, do_sample=False,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    batch = PagedBatch(pair.ours.model, block_size=4)
    (hidden,) = batch.step([("a", ids)])
    produced: list[int] = []
    for _ in range(num_new):
        token = int(pair.ours.model.compute_logits(hidden[-1:]).argmax(-1))
        produced.append(token)
        (hidden,) = batch.step([("a", [token])])
    assert produced == expected


def test_mixed_batch_decode_and_prefill_chunk(pair: Pair) -> None:
    a, b = _prompt(3, 9), _prompt(4, 10)
    batch = PagedBatch(pair.ours.model, block_size=4)
    batch.step([("a", a[:8]), ("b", b[:3])])  # a: prompt; b: first chunk, becomes a cached prefix
    hidden_a, hidden_b = batch.step([("a", a[8:]), ("b", b[3:])])  # a decodes one token, b prefills 7
    logits_a = pair.ours.model.compute_logits(hidden_a)
    logits_b = pair.ours.model.compute_logits(hidden_b)
    torch.testing.assert_close(logits_a, _hf_logits(pair.hf, a)[8:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_b, _hf_logits(pair.hf, b)[3:], atol=ATOL, rtol=0)
