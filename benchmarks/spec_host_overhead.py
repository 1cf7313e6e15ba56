"""The host's cost of a speculating engine step, with device compute made negligible (CPU, issue 23).

Why: on a GPU a plain batch-1 step of a small model is host-bound but async scheduling hides
that work behind the device; a speculating step is applied before the next is scheduled
(workers/inflight.py, `Batch.needs_sync`), so its whole host work is paid in series. This
script measures that work on the real engine: a tiny dummy Llama (`dummy:tiny-llama`, 2 layers
of 64, vocabulary 256: its forward is a few hundred microseconds of eager ops) with SmolLM2's
tokenizer attached (so outputs are detokenized as with the real model), batch 1, greedy, a
prompt that repeats a list of token ids 3 times, and weights set so that the model writes the list
again with one id changed, over and over (`make_copy_model`): n-gram / suffix drafts are mostly
accepted, as on issue 23's "repeat a list" task. Modes: plain async, plain sync, ngram k, suffix k,
in interleaved rounds (the machine is shared); greedy outputs must be identical in every mode.
Printed per mode (medians over decode steps, then over rounds): wall per engine step, per output
token (step / tokens per step), tokens per step, host (step minus forward and sampler), gap (from
a step's ids reaching the host to the next forward's start when no launched step was left unread,
else 0: the device's idle time on a GPU), overlapped (forwards launched before the previous step's
ids were read: async plain steps, and verify steps of host proposers since issue 23), acceptance; then
each step's own time by phase (nested phases subtracted): schedule, proposer, runner launch
(inputs, upload), forward, sampler, finish (ids to host, rejection sampling), update (accepted
drafts, KV block bookkeeping; a rejected draft's K/V needs no undo: num_computed_tokens stays
behind it), outputs (detokenize, RequestOutputs), other (engine loop); and the gap by phase.
`--device cuda` takes the GPU's host path (forward = graph launch; the wait is in finish). Last: each mode's steps by
runner path (decode graph, token-count graph, eager, verify as decode rows).
    python benchmarks/spec_host_overhead.py --rounds 3 --output-len 256
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from shardserve.workers.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from shardserve.workers.engine import LLMEngine
from shardserve.workers.models.loader import load_model
from shardserve.workers.request import SamplingParams

MODES = ("plain-async", "plain-sync", "ngram", "suffix")
PHASES = ("schedule", "proposer", "launch", "forward", "sampler", "finish", "update", "outputs", "other")


class PhaseClock:
    """Own time per phase: entering a phase stops the clock of the one it is nested in. A "gap" runs
    from a step's ids reaching the host (`mark="ids"`) to the next forward's start (`mark="forward"`);
    each closed gap is kept with the own time of each phase inside it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.gaps: list[tuple[float, dict[str, float]]] = []  # (seconds, own time per phase)
        self._stack: list[str] = []
        self._last = 0.0
        self._gap_start: float | None = None
        self._gap_phases: dict[str, float] = {}
        self.num_forwards = self.num_ids = self.num_overlapped = 0  # launches, ids read, launches ahead

    def wrap(self, owner: object, attribute: str, phase: str, mark: str | None = None) -> None:
        """Replace `owner.attribute` (a bound method or callable) with a timed one."""
        inner: Callable = getattr(owner, attribute)

        def timed(*args, **kwargs):
            if not self._stack:  # outside this clock's steps: another engine sharing the model object
                return inner(*args, **kwargs)
            self._switch(phase)
            if mark == "forward":
                if self.num_forwards > self.num_ids:  # a launched step is still unread: the device has work
                    self.num_overlapped += 1
                    if self._gap_start is not None:
                        self.gaps.append((0.0, {}))
                elif self._gap_start is not None:
                    self.gaps.append((self._last - self._gap_start, self._gap_phases))
                self._gap_start, self._gap_phases = None, {}
                self.num_forwards += 1
            try:
                return inner(*args, **kwargs)
            finally:
                self._pop()
                if mark == "ids":
                    self.num_ids += 1
                    self._gap_start, self._gap_phases = self._last, {}

        setattr(owner, attribute, timed)

    def _charge(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds
        if self._gap_start is not None:
            self._gap_phases[phase] = self._gap_phases.get(phase, 0.0) + seconds

    def _switch(self, phase: str) -> None:
        now = time.perf_counter()
        if self._stack:
            self._charge(self._stack[-1], now - self._last)
        self._stack.append(phase)
        self._last = now

    def _pop(self) -> None:
        now = time.perf_counter()
        self._charge(self._stack.pop(), now - self._last)
        self._last = now

    def step(self, engine: LLMEngine) -> list:
        self._switch("other")
        try:
            return engine.step()
        finally:
            self._pop()


@dataclass
class Steps:
    """A mode's decode steps: wall and own time per phase of each; each gap and its phases."""

    walls: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    gaps: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    tokens: int = 0
    forwards: int = 0
    overlapped: int = 0  # forwards launched while an earlier step's ids were unread


@dataclass
class ModeRun:
    """Per round: median step wall, median host part, tokens per step, median gap; medians by phase."""

    step_s: list[float] = field(default_factory=list)
    host_s: list[float] = field(default_factory=list)  # step wall - forward - sampler
    tokens_per_step: list[float] = field(default_factory=list)
    gap_s: list[float] = field(default_factory=list)
    overlapped: list[float] = field(default_factory=list)  # share of forwards launched ahead
    phases: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    gap_phases: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    acceptance: float = 0.0

    def add_round(self, steps: Steps) -> None:
        self.step_s.append(statistics.median(steps.walls))
        self.host_s.append(statistics.median(w - p.get("forward", 0.0) - p.get("sampler", 0.0)
                                             for w, p in zip(steps.walls, steps.phases, strict=True)))
        self.tokens_per_step.append(steps.tokens / len(steps.walls))
        self.gap_s.append(statistics.median(g for g, _ in steps.gaps) if steps.gaps else float("nan"))
        self.overlapped.append(steps.overlapped / max(steps.forwards, 1))
        for name in PHASES:
            self.phases[name].append(statistics.median(p.get(name, 0.0) for p in steps.phases))
            if steps.gaps:
                self.gap_phases[name].append(statistics.median(p.get(name, 0.0) for _, p in steps.gaps))


def build_engine(mode: str, args: argparse.Namespace, loaded) -> tuple[LLMEngine, PhaseClock]:
    spec = None
    if mode in ("ngram", "suffix"):
        spec = SpeculativeConfig(speculative_method=mode, num_speculative_tokens=args.k)
    config = EngineConfig(
        model=ModelConfig(model=args.model, device=args.device, dtype="float32"),
        cache=CacheConfig(num_blocks=256),  # a small pool: the CPU default allocates (and zeroes) gigabytes
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, async_scheduling=mode != "plain-sync"),
        speculative=spec or SpeculativeConfig(),
    )
    engine = LLMEngine(config, loaded=loaded)
    clock = PhaseClock()
    runner = engine.runner
    clock.wrap(engine.scheduler, "schedule", "schedule")
    clock.wrap(engine.scheduler, "update_from_output", "update")
    if engine.speculator is not None:
        clock.wrap(engine.speculator, "propose", "proposer")
        clock.wrap(engine.speculator, "prefetch", "proposer")
    clock.wrap(runner, "launch", "launch")
    clock.wrap(runner, "finish", "finish", mark="ids")
    clock.wrap(runner.model, "forward", "forward", mark="forward")  # nn.Module.__call__ finds the instance attribute
    clock.wrap(runner.model, "compute_logits", "forward")
    for graphs in (runner.graphs, runner.verify_graphs, runner.mixed_graphs):  # CUDA: a replay is the forward
        if graphs is not None:
            clock.wrap(graphs, "run", "forward", mark="forward")
    clock.wrap(runner, "sampler", "sampler")
    clock.wrap(engine, "_build_outputs", "outputs")
    clock.wrap(engine.outputs, "collect", "outputs")
    return engine, clock


def run_once(engine: LLMEngine, clock: PhaseClock, prompt: list[int], args: argparse.Namespace, tag: str,
             steps: Steps) -> tuple[int, ...]:
    """One request to the end, its decode steps (not the prompt's) added to `steps`; its token ids."""
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            final_only=not args.stream)
    engine.add_request(tag, prompt, params)
    token_ids: tuple[int, ...] = ()
    while engine.has_unfinished_requests():
        request = engine.scheduler.requests.get(tag)
        decoding = request is not None and request.num_output_tokens > 0
        before, num_gaps = dict(clock.totals), len(clock.gaps)
        forwards, overlapped = clock.num_forwards, clock.num_overlapped
        start = time.perf_counter()
        outs = clock.step(engine)
        wall = time.perf_counter() - start
        if decoding:
            steps.walls.append(wall)
            steps.phases.append({name: seconds - before.get(name, 0.0) for name, seconds in clock.totals.items()})
            steps.gaps += clock.gaps[num_gaps:]
            steps.forwards += clock.num_forwards - forwards
            steps.overlapped += clock.num_overlapped - overlapped
        for out in outs:
            if out.finished:
                token_ids = out.outputs[0].token_ids
    clock.gaps.clear()
    steps.tokens += len(token_ids) - 1
    return token_ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:tiny-llama")
    parser.add_argument("--tokenizer", default="default",
                        help="model whose tokenizer detokenizes the outputs (`none`: token ids only)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one request per mode each)")
    parser.add_argument("--requests", type=int, default=2, help="requests per mode per round (one at a time)")
    parser.add_argument("--stream", action="store_true", help="per-step outputs (final_only off), as a stream")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU's host path (CUDA graphs, pinned uploads); forward = the launch")
    parser.add_argument("--profile", default=None, help="cProfile this mode's rounds: top functions by own time")
    return parser.parse_args(argv)


def repetitive_task(vocab_size: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """("repeat a list with one change"): the prompt, a list of 24 distinct random ids (not the first
    3: special tokens) 3 times, and the cycle the model is made to write: the list with its 6th id
    replaced by one not in it."""
    rng = random.Random(seed)
    ids = rng.sample(range(3, vocab_size), 25)
    block = ids[:24]
    cycle = list(block)
    cycle[5] = ids[24]
    return block * 3, cycle


@torch.no_grad()
def make_copy_model(model: torch.nn.Module, cycle: list[int]) -> None:
    """Make the model's greedy next token a function of its input token: cycle[i] -> cycle[i + 1].
    Every o_proj / down_proj is zeroed (the residual stream stays the token's embedding e), and the
    LM head gets its own weight whose row of cycle[i + 1] is e(cycle[i]) (an embedding's dot product
    with itself dwarfs its products with the others). The forward still runs every op."""
    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            module.weight.zero_()
    embedding = model.model.embed_tokens.weight
    head = embedding.detach().clone() * 0.1
    for i, token in enumerate(cycle):
        head[cycle[(i + 1) % len(cycle)]] = embedding[token]
    model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)


def main() -> None:
    args = parse_args()
    modes = args.modes.split(",")
    bad = set(modes) - set(MODES)
    if bad:
        raise SystemExit(f"--modes takes {', '.join(MODES)}, got {sorted(bad)}")
    torch.set_num_threads(args.threads)
    cpu, device = torch.device("cpu"), torch.device(args.device)
    loaded = load_model(ModelConfig(model=args.model, device=args.device, dtype="float32"), device, torch.float32)
    if args.tokenizer != "none":
        tokenizer = load_model(ModelConfig(model=args.tokenizer, device="cpu"), cpu, torch.float32,
                               weights=False).tokenizer
        loaded = replace(loaded, tokenizer=tokenizer)
    prompt, cycle = repetitive_task(loaded.hf_config.vocab_size)
    make_copy_model(loaded.model, cycle)
    engines = {mode: build_engine(mode, args, loaded) for mode in modes}
    runs = {mode: ModeRun() for mode in modes}
    outputs: dict[str, tuple[int, ...]] = {}
    for mode, (engine, clock) in engines.items():  # first-call costs (new shapes, caches) are not measured
        run_once(engine, clock, prompt, args, f"{mode}-warm-up", Steps())
    profiler = cProfile.Profile() if args.profile else None
    for round_index in range(args.rounds):
        for mode in modes:
            engine, clock = engines[mode]
            steps = Steps()
            if profiler is not None and mode == args.profile:
                profiler.enable()
            for i in range(args.requests):
                ids = run_once(engine, clock, prompt, args, f"{mode}-{round_index}-{i}", steps)
                outputs.setdefault(mode, ids)
                if ids != outputs[mode]:
                    raise SystemExit(f"{mode}: greedy output changed between requests")
            if profiler is not None and mode == args.profile:
                profiler.disable()
            runs[mode].add_round(steps)
            if engine.speculator is not None:
                runs[mode].acceptance = engine.speculator.stats.acceptance_rate
    reference = outputs.get("plain-sync") or outputs.get("plain-async")
    print(f"{args.model} on {args.device}, batch 1, greedy, {len(prompt)}-token repetitive prompt, {args.output_len} tokens, "
          f"k = {args.k}, {args.rounds} rounds x {args.requests} requests, {torch.get_num_threads()} thread(s)"
          f"{', streamed' if args.stream else ''}{' (cProfile on: slower)' if profiler else ''}")
    print(f"{'mode':<12} {'ms/step':>8} {'us/token':>9} {'tok/step':>9} {'host ms/step':>13} {'gap ms':>7} "
          f"{'overlap':>8} {'accept':>7} same")
    for mode in modes:
        run = runs[mode]
        step_ms = statistics.median(run.step_s) * 1e3
        per_token_us = step_ms * 1e3 / statistics.median(run.tokens_per_step)
        same = "-" if reference is None else ("yes" if outputs[mode] == reference else "NO")
        gap = f"{statistics.median(run.gap_s) * 1e3:.3f}"
        print(f"{mode:<12} {step_ms:8.3f} {per_token_us:9.1f} {statistics.median(run.tokens_per_step):9.2f} "
              f"{statistics.median(run.host_s) * 1e3:13.3f} {gap:>7} {statistics.median(run.overlapped):8.0%} "
              f"{run.acceptance:7.0%} {same}")
    print("\nown time per step by phase, ms (median over steps, then over rounds)")
    print(f"{'mode':<12} " + " ".join(f"{n:>9}" for n in PHASES))
    for mode in modes:
        run = runs[mode]
        print(f"{mode:<12} " + " ".join(f"{statistics.median(run.phases[n]) * 1e3:9.3f}" for n in PHASES))
    print("\nthe gap by phase, ms (median over gaps, then over rounds): what the device waits for")
    print(f"{'mode':<12} " + " ".join(f"{n:>9}" for n in PHASES))
    for mode in modes:
        run = runs[mode]
        if run.gap_phases:
            print(f"{mode:<12} " + " ".join(f"{statistics.median(run.gap_phases[n]) * 1e3:9.3f}" for n in PHASES))
    print("\nsteps by runner path (all rounds, warm-up included): decode graph / token-count graph / eager / verify as decode rows")
    for mode, (engine, _) in engines.items():
        t = engine.runner.step_times
        print(f"{mode:<12} {t.graph_steps:6d} {t.mixed_graph_steps:6d} {t.eager_steps:6d} {t.verify_decode_steps:6d}")
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())
    for engine, _ in engines.values():
        engine.shutdown()
    if reference is not None and any(ids != reference for ids in outputs.values()):
        raise SystemExit("greedy outputs differ between modes")


if __name__ == "__main__":
    main()
