"""Perplexity of a model on a text, and its KL divergence and top-1 agreement with a reference.

Data flow: the text is tokenized once (the caller's job: `LLMEngine.tokenize`), then cut into
sliding windows (`plan_windows`): windows of `window` tokens whose starts advance by `stride`;
each token is a target of exactly one window, the first one that holds it after its own first
token, so it is scored with as much left context as the window gives (the recipe of Hugging
Face's "Perplexity of fixed-length models"; with stride == window the first token of every
window has no context and is not scored). For each window the model — and the reference, if
any — returns full-vocabulary log-probs of the window's targets through `score(token_ids,
num_targets)` ([num_targets, vocab] float32), and they are reduced at once to three sums (NLL,
KL(reference || model), argmax agreements): memory is one window's rows, never [T, vocab].

Why `LLMEngine.score` rather than prompt logprobs: `SamplingParams.prompt_logprobs` returns
top-N dicts per position through the scheduler and the output processor; the full vocabulary
(49k-150k entries per position) as Python dicts would cost seconds per window and gigabytes. The
engine method runs the same model, attention and paged KV cache in one chunked prefill without
sampling and hands back a tensor (workers/runner/scoring.py); `LLM.score` exposes it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm


class Scorer(Protocol):
    """`LLM` and `LLMEngine` both qualify."""

    def score(self, prompt: Sequence[int], num_targets: int | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Window:
    """token_ids[begin:end] is fed; the targets are the tokens at positions [end - num_targets, end)."""

    begin: int
    end: int
    num_targets: int


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    kl: float | None  # mean KL(reference || model) per target token, nats; None without a reference
    top1: float | None  # fraction of targets where both argmaxes agree; None without a reference
    tokens: int  # targets scored

    def to_json(self) -> dict[str, float | int | None]:
        return {"perplexity": self.perplexity, "kl": self.kl, "top1": self.top1, "tokens": self.tokens}


def check_window(window: int, stride: int) -> None:
    """ValueError naming the bad field and its range."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window = {window}], got {stride}")


def plan_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows over `num_tokens` tokens; their targets cover positions 1..num_tokens-1 once each
    when stride < window."""
    check_window(window, stride)
    if num_tokens < 2:
        raise ValueError(f"the text must have at least 2 tokens, got {num_tokens}")
    windows: list[Window] = []
    scored_to = 1  # the next position not yet scored (position 0 never is: it has no context)
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first_target = max(scored_to, begin + 1)
        if end > first_target:
            windows.append(Window(begin, end, end - first_target))
            scored_to = end
        if end == num_tokens:
            break
    return windows


@torch.inference_mode()
def evaluate_perplexity(
    model: Scorer,
    token_ids: Sequence[int],
    window: int = 512,
    stride: int = 256,
    reference: Scorer | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` on `token_ids`; with `reference`, mean KL(reference || model) and
    top-1 agreement on the same targets (both score the same windows)."""
    total_nll = total_kl = 0.0
    num_agree = num_targets = 0
    for win in tqdm(plan_windows(len(token_ids), window, stride), desc="windows", disable=not progress):
        ids = list(token_ids[win.begin : win.end])
        logprobs = model.score(ids, win.num_targets)  # [num_targets, vocab]
        targets = torch.tensor(ids[len(ids) - win.num_targets :], device=logprobs.device)  # [num_targets]
        total_nll -= logprobs.gather(1, targets[:, None]).double().sum().item()
        num_targets += win.num_targets
        if reference is None:
            continue
        ref_logprobs = reference.score(ids, win.num_targets).to(logprobs.device)  # [num_targets, vocab]
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"reference scores a vocabulary of {ref_logprobs.shape[1]} tokens, the model "
                             f"{logprobs.shape[1]}: KL needs the same vocabulary")
        # sum over the vocabulary of p_ref * (log p_ref - log p_model), per target row
        kl_rows = torch.nn.functional.kl_div(logprobs, ref_logprobs, reduction="none", log_target=True).sum(dim=1)
        total_kl += kl_rows.double().sum().item()
        num_agree += int((logprobs.argmax(dim=1) == ref_logprobs.argmax(dim=1)).sum())
    return PerplexityResult(
        perplexity=math.exp(total_nll / num_targets),
        kl=total_kl / num_targets if reference is not None else None,
        top1=num_agree / num_targets if reference is not None else None,
        tokens=num_targets,
    )
