"""`shardserve eval perplexity` and workers/eval/perplexity.py on the real SmolLM2 (CPU).

The text is the Apache-2.0 license that grpcio (a dependency) ships in its dist-info
(site-packages/grpcio-*.dist-info/licenses/LICENSE, ~6,500 SmolLM2 tokens), found through
importlib.metadata. Slices of it keep the runs short on two shared cores: every window costs
one prefill of the 135M model per engine.
  - our sliding-window perplexity equals transformers' (the float folder gguf_cache.py wrote
    for the same GGUF) on the same tokens and windows, within 1 %;
  - the model as its own reference: KL 0, top-1 1.0; bfloat16 against float32: KL > 0, top-1 < 1
    (on shuffled tokens, where near-ties are common);
  - the CLI prints exactly the four JSON keys and agrees with the library; bad flags exit 2.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from shardserve.cluster.cli import main
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.eval.perplexity import PerplexityResult, evaluate_perplexity, plan_windows
from shardserve.workers.models.gguf_cache import cached_folder
from shardserve.workers.models.loader import default_model_path
from shardserve.workers.request import SamplingParams

pytestmark = pytest.mark.slow

NUM_BLOCKS = 32  # 512 tokens of KV: more than any window here needs
SHORT, SHORT_WINDOW, SHORT_STRIDE = 24, 16, 8  # windows (0, 16), (8, 24)


def license_path() -> Path:
    dist = importlib.metadata.distribution("grpcio")
    path = next(Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == "LICENSE")
    assert path.is_file(), path
    return path


def _engine(dtype: str, loaded=None) -> LLMEngine:
    config = EngineConfig(model=ModelConfig(model="default", dtype=dtype, device="cpu"),
                          cache=CacheConfig(num_blocks=NUM_BLOCKS))
    return LLMEngine(config, loaded=loaded)


@pytest.fixture(scope="module")
def engine(smollm2_loaded) -> LLMEngine:
    return _engine("float32", smollm2_loaded)


@pytest.fixture(scope="module")
def token_ids(engine) -> list[int]:
    ids = engine.tokenize(license_path().read_text(encoding="utf-8"))
    assert len(ids) >= 2000, len(ids)
    return ids


def _hf_perplexity(hf_model, token_ids: list[int], window: int, stride: int) -> float:
    """The transformers recipe ("Perplexity of fixed-length models"): labels -100 except the
    window's last trg_len tokens, the mean loss times the number of shifted labels counted."""
    nll_sum, num_tokens, prev_end = 0.0, 0, 0
    ids = torch.tensor([token_ids])
    for begin in range(0, len(token_ids), stride):
        end = min(begin + window, len(token_ids))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.inference_mode():
            loss = hf_model(input_ids, labels=labels).loss
        num_valid = int((labels[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll_sum += loss.item() * num_valid
        num_tokens += num_valid
        prev_end = end
        if end == len(token_ids):
            break
    return math.exp(nll_sum / num_tokens)


def test_windows_score_every_token_once():
    windows = plan_windows(1000, 512, 200)
    targets = [p for w in windows for p in range(w.end - w.num_targets, w.end)]
    assert targets == list(range(1, 1000))
    assert all(w.end - w.begin <= 512 and w.end - w.num_targets > w.begin for w in windows)


def test_perplexity_equals_transformers(engine, token_ids, smollm2_loaded):
    from transformers import AutoModelForCausalLM

    folder = cached_folder(default_model_path())  # written by the first load (smollm2_loaded)
    assert folder is not None
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, window, stride = token_ids[:64], 32, 16  # windows (0, 32), (16, 48), (32, 64)
    ours = evaluate_perplexity(engine, ids, window, stride)
    theirs = _hf_perplexity(hf_model, ids, window, stride)
    assert ours.tokens == len(ids) - 1
    assert 1.0 < ours.perplexity < 1000.0
    assert ours.perplexity == pytest.approx(theirs, rel=0.01)
    assert ours.to_json() == {"perplexity": ours.perplexity, "kl": None, "top1": None, "tokens": 63}


@pytest.mark.parametrize(
    ("prompt", "num_targets", "message"),
    [
        ([5], None, "at least 2 tokens, got 1"),
        ([5, 6, 7], 3, "num_targets must be in [1, 2]"),
        ([5, 49152], None, "prompt token ids must be in [0, 49152), got 49152 at position 1"),
        (list(range(NUM_BLOCKS * 16 + 1)), None, "needs 33 KV blocks"),
    ],
)
def test_score_refuses_bad_input(engine, prompt, num_targets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.score(prompt, num_targets)


@pytest.fixture(scope="module")
def against_itself(engine, token_ids) -> PerplexityResult:
    return evaluate_perplexity(engine, token_ids[:SHORT], SHORT_WINDOW, SHORT_STRIDE, reference=engine)


def test_model_against_itself(against_itself, engine):
    assert against_itself.tokens == SHORT - 1
    assert abs(against_itself.kl) < 1e-5
    assert against_itself.top1 == 1.0
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1, "score leaked KV blocks"


def test_score_between_steps_of_a_running_request(engine, token_ids):
    """Scoring takes its own blocks: a request running beside it keeps its KV cache (its greedy
    tokens are the argmax of the model's scores of its own sequence) and the score is unchanged."""
    alone = engine.score(token_ids[:SHORT_WINDOW])
    prompt = token_ids[100:108]
    engine.add_request("beside", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prompt's KV is in the cache now
    beside = engine.score(token_ids[:SHORT_WINDOW])
    generated: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated = list(out.outputs[0].token_ids)
    assert torch.equal(beside, alone)
    greedy = engine.score(prompt + generated, num_targets=len(generated)).argmax(dim=1)  # [4]
    assert greedy.tolist() == generated
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1


def test_bfloat16_against_float32(engine, token_ids):
    """On text with no structure (the license's tokens, shuffled with a fixed seed) the predictions
    are flat: near-ties, where bfloat16 rounding flips the argmax, are common (3 of 23 here)."""
    bf16 = _engine("bfloat16")
    shuffled = list(token_ids[:200])
    random.Random(0).shuffle(shuffled)
    result = evaluate_perplexity(bf16, shuffled[:SHORT], SHORT_WINDOW, SHORT_STRIDE, reference=engine)
    assert result.tokens == SHORT - 1
    assert result.kl > 1e-4
    assert result.top1 < 1.0


def test_cli_json_matches_the_library(against_itself, capsys):
    argv = ["eval", "perplexity", "--model", "default", "--reference", "default", "--dtype", "float32",
            "--device", "cpu", "--text", str(license_path()), "--max-tokens", str(SHORT),
            "--window", str(SHORT_WINDOW), "--stride", str(SHORT_STRIDE), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["perplexity", "kl", "top1", "tokens"]
    assert printed["tokens"] == against_itself.tokens
    assert printed["perplexity"] == pytest.approx(against_itself.perplexity, rel=1e-5)
    assert abs(printed["kl"]) < 1e-5
    assert printed["top1"] == 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--text", "/nonexistent/text.txt"], "--text /nonexistent/text.txt: no such file"),
        (["--window", "1"], "window must be >= 2 tokens, got 1"),
        (["--window", "16", "--stride", "17"], "stride must be in [1, window = 16], got 17"),
        (["--max-tokens", "1"], "max_tokens must be >= 2, got 1"),
        (["--quantization", "bogus"], "quantization must be null"),  # passed through to ModelConfig
    ],
)
def test_cli_bad_arguments(flags, message, capsys):
    argv = ["eval", "perplexity", "--device", "cpu", "--text", str(license_path()), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
