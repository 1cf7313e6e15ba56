"""Prompt scoring: full-vocabulary log-probs of a token sequence, one prefill through the runner.

`score_tokens(runner, token_ids, block_ids, num_targets)` feeds `token_ids` to the runner's
model in chunks of at most `chunk_size` tokens (the step budget, max_num_batched_tokens, so the
activation peak stays the one the KV budget was profiled for). Each chunk writes its K/V into
the runner's paged cache at `block_ids` (taken from the engine's block pool by the caller) and
attends to the chunks before it there, exactly as a chunked prefill does. Only the rows that
predict one of the last `num_targets` tokens go through the LM head and log_softmax (float32).
No sampler, no persistent-batch row, no CUDA graph: the runner's state for running requests is
untouched, so the engine may score between steps (LLMEngine.score frees the blocks after).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from shardserve.workers.runner.inputs import build_model_inputs
from shardserve.workers.runner.model_runner import ModelRunner
from shardserve.workers.step_types import ScheduledRequest, SchedulerOutput

SCORE_REQUEST_ID = "score"


@torch.inference_mode()
def score_tokens(
    runner: ModelRunner, token_ids: Sequence[int], block_ids: Sequence[int], num_targets: int, chunk_size: int
) -> torch.Tensor:
    """[num_targets, vocab_size] float32 log-probs: row i is the distribution over the token at
    position len(token_ids) - num_targets + i, given every token before it.

    block_ids must hold len(token_ids) tokens; num_targets in [1, len(token_ids) - 1].
    """
    num_tokens = len(token_ids)
    if not 1 <= num_targets <= num_tokens - 1:
        raise ValueError(f"num_targets must be in [1, {num_tokens - 1}] (tokens - 1), got {num_targets}")
    first_row = num_tokens - 1 - num_targets  # the position whose logits predict the first target
    blocks = tuple(block_ids)
    rows: list[torch.Tensor] = []
    for start in range(0, num_tokens - 1, chunk_size):  # the last token predicts nothing: never fed
        end = min(start + chunk_size, num_tokens - 1)
        req = ScheduledRequest(SCORE_REQUEST_ID, tuple(token_ids[start:end]), start, blocks, sample=False)
        inputs = build_model_inputs(SchedulerOutput((), (req,), end - start), runner.block_size, runner.device)
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn_metadata)
        if end <= first_row:
            continue
        wanted = hidden[max(first_row - start, 0) :]  # [rows predicting targets, hidden_size]
        rows.append(runner.model.compute_logits(wanted).float().log_softmax(dim=-1))  # [rows, vocab_size]
    return torch.cat(rows) if len(rows) > 1 else rows[0]
