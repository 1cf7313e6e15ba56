"""OutputProcessor: turns per-step token ids into the RequestOutputs callers see.

For each user request it keeps one `_Sample` per completion (n of them): an incremental
detokenizer with stop-string matching, the logprobs so far and the text already emitted.
`process()` feeds each request's new tokens (one, or several after accepted drafts) through its sample, reports stop-string matches
back to the engine (which finishes those requests in the scheduler), and marks the parent
dirty; `collect()` then builds one RequestOutput per dirty parent, in the order the parents
were added — cumulative text and ids, plus this step's delta — and forgets parents once their
final output has been collected. Dirty parents are kept in a dict of their own, so a step costs
what it advanced, not every parent in the engine.
Parents whose params say `final_only` get no snapshot until they finish (at a few hundred
running requests, the per-step snapshots were the largest host cost of an offline step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.workers.output.stream import CompletionTextStream
from shardserve.workers.request import (
    CompletionOutput,
    FinishReason,
    Logprob,
    PositionLogprobs,
    Request,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)
from shardserve.workers.step_types import ModelRunnerOutput, PromptLogprobs, TokenLogprobs


@dataclass
class _Sample:
    request: Request
    stream: CompletionTextStream | None  # None when the model has no tokenizer (token ids only)
    text: str = ""
    new_text: str = ""
    num_emitted_tokens: int = 0  # output ids already reported in an earlier output
    num_fed_tokens: int = 0  # output ids already fed through the text stream
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    samples: list[_Sample]
    order: int = 0  # when it was added: outputs come in this order
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = field(default=None)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    @property
    def requests_finished(self) -> bool:
        """Every sample's request is done (its snapshot may not have taken the reason yet)."""
        for sample in self.samples:  # a loop, not all(): this runs per request and step (final_only)
            if sample.finish_reason is None and sample.request.finish_reason is None:
                return False
        return True


def _added_order(parent: _Parent) -> int:
    return parent.order


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._sample_of: dict[str, tuple[_Parent, _Sample]] = {}  # sample request id -> its state
        self._dirty: dict[str, _Parent] = {}  # parents with something to report at the next collect()
        self._num_added = 0
        self.num_finished = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parents

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            samples: list[Request]) -> None:
        parent = _Parent(request_id, prompt, tuple(prompt_token_ids), params, [], order=self._num_added)
        self._num_added += 1
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = []
        for request in samples:
            stream = None
            if self.tokenizer is not None:
                stream = CompletionTextStream(self.tokenizer, prompt_token_ids, request.sampling_params)
            sample = _Sample(request, stream, logprobs=[] if params.logprobs is not None else None)
            parent.samples.append(sample)
            self._sample_of[request.request_id] = (parent, sample)
        self._parents[request_id] = parent

    def sample_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return [] if parent is None else [s.request.request_id for s in parent.samples]

    def billing(self, sample_id: str) -> tuple[Request, RequestMetrics] | None:
        """A live sample and the metrics its caller sees (the first sample's: every sample's cost
        adds up there); None once the parent's final output was collected (workers/cost.py)."""
        entry = self._sample_of.get(sample_id)
        return None if entry is None else (entry[1].request, entry[0].samples[0].request.metrics)

    def has_pending(self) -> bool:
        return bool(self._dirty)

    def process(
        self, scheduled_ids: list[str], advanced: list[Request], runner_output: ModelRunnerOutput
    ) -> list[tuple[str, str]]:
        """Feed this step's tokens; returns (sample request id, stop string) for each stop-string match.

        A scheduled request that the scheduler finished without a new token (KV cache full)
        still needs its final output, so its parent is marked dirty too.
        """
        stops: list[tuple[str, str]] = []
        sample_of, dirty = self._sample_of, self._dirty
        for sample_id in scheduled_ids:
            parent, sample = sample_of[sample_id]
            if sample.request.is_finished:
                dirty[parent.request_id] = parent
        for sample_id, chunk in runner_output.prompt_logprobs.items():
            parent, _ = sample_of[sample_id]
            if parent.prompt_logprobs is not None:
                self._write_prompt_logprobs(parent, chunk)
        for request in advanced:
            parent, sample = sample_of[request.request_id]
            dirty[parent.request_id] = parent
            num_fed, num_output = sample.num_fed_tokens, len(request.output_token_ids)
            if num_output == num_fed:
                continue  # finished by the scheduler without a new token (kv_cache_full)
            sample.num_fed_tokens = num_output
            # one token, or accepted drafts + one (speculative decoding: never with logprobs)
            new_ids = [request.output_token_ids[-1]] if num_output == num_fed + 1 else request.output_token_ids[num_fed:]
            if sample.logprobs is not None and request.request_id in runner_output.logprobs:
                sample.logprobs.append(self._decode_logprobs(runner_output.logprobs[request.request_id]))
            if sample.stream is not None:
                for i, token_id in enumerate(new_ids):
                    delta = sample.stream.append([token_id])
                    sample.new_text += delta.text
                    if delta.stop_str is not None:
                        if not request.is_finished:
                            stops.append((request.request_id, delta.stop_str))
                        if i + 1 < len(new_ids):  # drafts past the stop string: as if never sampled
                            request.drop_output_tokens(len(new_ids) - i - 1)
                            sample.num_fed_tokens = len(request.output_token_ids)
                        break
        return stops

    def finish_sample(self, request: Request, reason: FinishReason) -> None:
        """Finish a sample that never reached the scheduler (an aborted held sample)."""
        parent, sample = self._sample_of[request.request_id]
        request.finish_reason = reason
        sample.finish_reason = reason
        self._dirty[parent.request_id] = parent

    def abort(self, request_id: str) -> None:
        parent = self._parents.get(request_id)
        if parent is None:
            return
        for sample in parent.samples:
            if sample.finish_reason is None and sample.request.finish_reason is None:
                sample.request.finish_reason = FinishReason.ABORT
        self._dirty[request_id] = parent

    def collect(self) -> list[RequestOutput]:
        outputs = []
        for parent in sorted(self._dirty.values(), key=_added_order):
            del self._dirty[parent.request_id]
            if parent.params.final_only and not parent.requests_finished:
                continue
            outputs.append(self._snapshot(parent))
            if parent.finished:
                self.num_finished += 1
                del self._parents[parent.request_id]
                for sample in parent.samples:
                    del self._sample_of[sample.request.request_id]
        return outputs

    def _snapshot(self, parent: _Parent) -> RequestOutput:
        completions = []
        for index, sample in enumerate(parent.samples):
            request = sample.request
            if sample.finish_reason is None and request.finish_reason is not None:
                sample.finish_reason = request.finish_reason
                sample.stop_reason = request.stop_reason
            if sample.stream is not None and sample.finish_reason is not None:
                tail = sample.stream.flush()  # held-back text (partial characters / stop strings)
                sample.new_text += tail.text
                if tail.stop_str is not None and sample.finish_reason != FinishReason.ABORT:
                    sample.finish_reason, sample.stop_reason = FinishReason.STOP, tail.stop_str
            new_text, sample.new_text = sample.new_text, ""
            sample.text += new_text
            token_ids = tuple(request.output_token_ids)
            new_token_ids = token_ids[sample.num_emitted_tokens :]
            sample.num_emitted_tokens = len(token_ids)
            completions.append(
                CompletionOutput(
                    index=index,
                    text=sample.text,
                    token_ids=token_ids,
                    new_text=new_text,
                    new_token_ids=new_token_ids,
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason,
                    logprobs=None if sample.logprobs is None else tuple(sample.logprobs),
                )
            )
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=tuple(completions),
            finished=parent.finished,
            metrics=parent.samples[0].request.metrics,
            prompt_logprobs=None if parent.prompt_logprobs is None else tuple(parent.prompt_logprobs),
        )

    def _write_prompt_logprobs(self, parent: _Parent, chunk: PromptLogprobs) -> None:
        """Put the chunk's entries into prompt positions first, first + 1, ...: a position computed again
        (a request preempted mid-prompt recomputes its prompt from the start; the other samples of
        an n > 1 request prefill it too) overwrites its slot, so there is one entry per position."""
        slots = parent.prompt_logprobs
        assert slots is not None
        first, entries = chunk.first_position, chunk.entries
        stop = min(first + len(entries), len(parent.prompt_token_ids))
        if stop <= first:
            return
        if first > len(slots):  # positions never reported (not expected): keep later ones aligned
            slots.extend([None] * (first - len(slots)))
        slots[first:stop] = [self._decode_logprobs(e) for e in entries[: stop - first]]

    def _decode_logprobs(self, entry: TokenLogprobs | None) -> PositionLogprobs | None:
        if entry is None:
            return None
        if self.tokenizer is None:
            return entry
        decode = self.tokenizer.decode
        return {token_id: Logprob(lp.logprob, lp.rank, decode([token_id])) for token_id, lp in entry.items()}
