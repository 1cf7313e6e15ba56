"""Sampling options of the persistent batch, kept per row and turned into SamplingMetadata by diffs.

Data flow: `add(row, params, prompt, outputs)` writes a request's options into numpy columns
(`[7, max_rows]` float32: temperature, top_k, top_p, min_p, repetition, presence, frequency)
and counts its outputs; `move`/`clear` follow the persistent batch's row moves. `build(rows)`
gives the sampler its `SamplingMetadata` for the rows that sample this step, in logits order.
The per-row tensors and flags only change when the batch does, so they are cached under a
version counter, per set of rows (a verify step samples 1 + drafts rows per request): a step re-uses them and only computes the parts that depend on
the step — seeds of seeded rows, min_tokens masks — by walking just the rows that need them.
Penalty histories live on the device as one flat (token id, row) list: appended with each
step's sampled tokens of penalty rows (`record`), rebuilt from the host copy only when a
penalty row joins, leaves or moves, and remapped from rows to logits rows on the device.
Async scheduling splits `record` in two: `count_sampled` at launch (output counts feed seeds
and min_tokens masks) and `record_tokens` once the ids are on the host; a step that samples a
penalty row is therefore finished before the next one is launched (the engine runs it
synchronously), so histories never miss a token.
Equivalent to a one-pass build over the same rows (tests/sampling_reference.py; tests/runner check that).
"""

from __future__ import annotations

import numpy as np
import torch
from shardserve.workers.request import SamplingParams
from shardserve.workers.sampling.metadata import SamplingMetadata, TokenHistory, step_seed

MAX_CACHED_ROW_SETS = 16  # static parts kept per batch version (emptied when full)
_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


class SamplingState:
    def __init__(self, max_rows: int, eos_token_id: int | None, device: torch.device) -> None:
        self.max_rows = max_rows
        self.eos_token_id = eos_token_id
        self.device = device
        self.columns = np.zeros((len(_FIELDS), max_rows), dtype=np.float32)  # [7, max_rows]
        self.params: list[SamplingParams | None] = [None] * max_rows
        self.num_outputs = np.zeros(max_rows, dtype=np.int64)
        self.special_rows: set[int] = set()  # seeded or min_tokens rows: per-step host work
        self.penalty_rows: dict[int, tuple[list[int], list[int]]] = {}  # row -> (prompt, outputs)
        self.version = 0
        # rows.tobytes() -> the static part of their metadata, for the batch's current version. Several
        # row sets recur within one version: a speculating request samples 1 + its drafts rows, and
        # its number of drafts changes from step to step.
        self._cache_version = -1
        self._cache: dict[bytes, dict[str, object]] = {}
        self._history_dirty = True
        self._out_ids = torch.zeros(0, dtype=torch.int64, device=device)  # [N] device history
        self._out_rows = torch.zeros(0, dtype=torch.int64, device=device)  # [N] persistent rows
        self._prompt_ids = torch.zeros(0, dtype=torch.int64, device=device)
        self._prompt_rows = torch.zeros(0, dtype=torch.int64, device=device)

    # ---- rows in and out ----------------------------------------------------------------------

    def add(self, row: int, params: SamplingParams, prompt: list[int], outputs: list[int]) -> None:
        self.columns[:, row] = [float(getattr(params, f)) for f in _FIELDS]
        self.params[row] = params
        self.num_outputs[row] = len(outputs)
        if params.seed is not None or params.min_tokens > 0:
            self.special_rows.add(row)
        if params.repetition_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0:
            self.penalty_rows[row] = (list(prompt), list(outputs))
            self._history_dirty = True
        self.version += 1

    def clear(self, row: int) -> None:
        self.params[row] = None
        self.special_rows.discard(row)
        if self.penalty_rows.pop(row, None) is not None:
            self._history_dirty = True
        self.version += 1

    def move(self, src: int, dst: int) -> None:
        self.columns[:, dst] = self.columns[:, src]
        self.params[dst], self.num_outputs[dst] = self.params[src], self.num_outputs[src]
        self.params[src] = None
        if src in self.special_rows:
            self.special_rows.discard(src)
            self.special_rows.add(dst)
        if src in self.penalty_rows:
            self.penalty_rows[dst] = self.penalty_rows.pop(src)
            self._history_dirty = True
        self.version += 1

    def record(self, rows: np.ndarray, token_ids: list[int]) -> None:
        """Fold this step's sampled tokens (logits order, `rows` their persistent rows) in."""
        self.count_sampled(rows)
        self.record_tokens(rows, token_ids)

    def count_sampled(self, rows: np.ndarray) -> None:
        """One more output for each of `rows` (needs no token id: seeds and min_tokens masks of
        the next step only depend on how many tokens were sampled, so async scheduling counts
        at launch, before the ids reach the host)."""
        self.num_outputs[rows] += 1

    def has_penalties(self, rows: np.ndarray) -> bool:
        """True if any of `rows` applies a repetition / presence / frequency penalty."""
        return bool(self.penalty_rows) and any(int(r) in self.penalty_rows for r in rows.tolist())

    def record_tokens(self, rows: np.ndarray, token_ids: list[int]) -> None:
        """Append the sampled ids of penalty rows to their histories (host and device)."""
        if not self.penalty_rows:
            return
        new_ids, new_rows = [], []
        for i, row in enumerate(rows.tolist()):
            entry = self.penalty_rows.get(row)
            if entry is not None:
                entry[1].append(token_ids[i])
                new_ids.append(token_ids[i])
                new_rows.append(row)
        if new_ids and not self._history_dirty:
            self._out_ids = torch.cat([self._out_ids, torch.tensor(new_ids, device=self.device)])
            self._out_rows = torch.cat([self._out_rows, torch.tensor(new_rows, device=self.device)])

    # ---- one step -----------------------------------------------------------------------------

    def build(self, rows: np.ndarray) -> SamplingMetadata:
        """Metadata of the sampling rows `rows` ([n] persistent rows, logits order)."""
        if self._cache_version != self.version or len(self._cache) >= MAX_CACHED_ROW_SETS:
            self._cache.clear()
            self._cache_version = self.version
        key = rows.tobytes()
        static = self._cache.get(key)
        if static is None:
            static = self._cache[key] = self._static_part(rows)
        mask_rows: list[int] = []
        mask_tokens: list[int] = []
        seeded_rows: list[int] = []
        seeded_seeds: list[int] = []
        if self.special_rows:
            position = {int(r): i for i, r in enumerate(rows.tolist()) if int(r) in self.special_rows}
            for row in sorted(position, key=position.get):
                i, p = position[row], self.params[row]
                assert p is not None
                n_out = int(self.num_outputs[row])
                if n_out < p.min_tokens:
                    banned = set(p.stop_token_ids)
                    if self.eos_token_id is not None and not p.ignore_eos:
                        banned.add(self.eos_token_id)
                    for token in sorted(banned):
                        mask_rows.append(i)
                        mask_tokens.append(token)
                if p.seed is not None and p.temperature != 0:
                    seeded_rows.append(i)
                    seeded_seeds.append(step_seed(p.seed, n_out))
        prompt_tokens, output_tokens = self._histories(rows, static)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        return SamplingMetadata(
            **static["fields"],
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            min_tokens_rows=longs(mask_rows) if mask_rows else None,
            min_tokens_token_ids=longs(mask_tokens) if mask_rows else None,
            seeded_rows=tuple(seeded_rows),
            seeded_step_seeds=tuple(seeded_seeds),
        )

    def _static_part(self, rows: np.ndarray) -> dict[str, object]:
        cols = self.columns[:, rows]  # [7, n]
        temperature, top_k, top_p, min_p, repetition, presence, frequency = cols
        packed = torch.from_numpy(np.ascontiguousarray(cols)).to(self.device, non_blocking=True)
        raw_t, top_k_t, top_p_t, min_p_t, rep_t, pres_t, freq_t = packed.unbind(0)
        greedy = temperature == 0
        greedy_mask = raw_t == 0
        needs_repetition = bool((repetition != 1.0).any())
        no_penalties = not needs_repetition and bool((presence == 0).all() and (frequency == 0).all())
        fields = dict(
            temperatures=raw_t.masked_fill(greedy_mask, 1.0), greedy_mask=greedy_mask,
            all_greedy=bool(greedy.all()), all_random=not bool(greedy.any()),
            top_k=top_k_t.to(torch.int64), max_top_k=int(top_k.max()), no_top_k=bool((top_k == 0).all()),
            all_top_k=bool((top_k > 0).all()), top_p=top_p_t, no_top_p=bool((top_p == 1.0).all()),
            min_p=min_p_t, no_min_p=bool((min_p == 0.0).all()), repetition_penalties=rep_t,
            presence_penalties=pres_t, frequency_penalties=freq_t, no_penalties=no_penalties,
            num_logprobs=tuple(self.params[r].logprobs for r in rows.tolist()),
        )
        lut = None
        if not no_penalties:  # persistent row -> logits row (rows that do not sample: -1)
            table = np.full(self.max_rows, -1, dtype=np.int64)
            table[rows] = np.arange(rows.size)
            lut = torch.from_numpy(table).to(self.device)
        return {"fields": fields, "needs_repetition": needs_repetition, "lut": lut}

    def _histories(self, rows: np.ndarray, static: dict[str, object]) -> tuple[TokenHistory | None, TokenHistory | None]:
        if static["fields"]["no_penalties"]:
            return None, None
        if self._history_dirty:
            self._rebuild_history()
        lut = static["lut"]
        assert isinstance(lut, torch.Tensor)

        def remap(ids: torch.Tensor, hist_rows: torch.Tensor) -> TokenHistory:
            target = lut[hist_rows]  # [N] logits row or -1
            valid = target >= 0
            # Rows that do not sample this step: id -1 lands in the dropped out-of-vocab bin of row 0.
            return TokenHistory(token_ids=torch.where(valid, ids, -1), row_ids=torch.where(valid, target, 0))

        prompt = remap(self._prompt_ids, self._prompt_rows) if static["needs_repetition"] else None
        return prompt, remap(self._out_ids, self._out_rows)

    def _rebuild_history(self) -> None:
        out_ids, out_rows, prompt_ids, prompt_rows = [], [], [], []
        for row, (prompt, outputs) in self.penalty_rows.items():
            out_ids.extend(outputs)
            out_rows.extend([row] * len(outputs))
            prompt_ids.extend(prompt)
            prompt_rows.extend([row] * len(prompt))

        def dev(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(self.device)

        self._out_ids, self._out_rows = dev(out_ids), dev(out_rows)
        self._prompt_ids, self._prompt_rows = dev(prompt_ids), dev(prompt_rows)
        self._history_dirty = False
