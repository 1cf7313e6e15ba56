"""Where a CPU verify step's time goes: plain step vs verify steps of 1 + k rows, per op, in CPU time.

The embedded SmolLM2 kept packed (`--quantization gguf`) decodes one greedy request twice per k:
plain, then with an oracle proposer that drafts the plain run's own next k tokens (all accepted,
so every verify step has exactly 1 + k rows). Each engine step is timed with `time.process_time`
(the process's CPU time: robust to other tenants on a loaded machine, unlike wall time) and split
by wrapping the model's `forward` (decoder stack: projections, attention, norms) and
`compute_logits` (LM head); "other" = the rest of the step (sampler, acceptance, host bookkeeping).
A micro-benchmark then times every projection and the LM head alone at M rows (same kernels), so
forward - matmuls = attention, norms, rope and dispatch. torch runs 1 thread (`--threads`) so CPU
time is the work done. Medians over all steps (and `--repeats` micro calls) are printed.

    .venv/bin/python benchmarks/cpu_verify_profile.py [--cpu-activations int8] [--ks 1,2,4,8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from shardserve.workers.bench.spec_tasks import TASKS
from shardserve.workers.llm import LLM
from shardserve.workers.quant.cpu_kernels import best_isa
from shardserve.workers.request import SamplingParams


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class OracleProposer:
    """Drafts the next k tokens of a known greedy continuation (every draft accepted)."""

    def __init__(self) -> None:
        self.want: list[int] = []
        self.off = False

    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, max_tokens: int) -> list[int]:
        done = len(token_ids) - num_prompt_tokens
        return [] if self.off else self.want[done:done + max_tokens]

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        pass


class StepClock:
    """CPU time of each engine step and of the model's forward / LM head inside it, by row count."""

    def __init__(self, llm: LLM) -> None:
        self.model = llm.engine.loaded.model
        self.rows = 0
        self.part = {"forward": 0.0, "head": 0.0}
        self.steps: dict[int, list[dict[str, float]]] = {}
        self._wrap("forward", "forward")
        self._wrap("compute_logits", "head")

    def _wrap(self, name: str, key: str) -> None:
        inner: Callable = getattr(self.model, name)

        def timed(*args, **kwargs):
            if key == "forward":
                self.rows = args[0].shape[0] if args else kwargs["input_ids"].shape[0]
            start = time.process_time()
            out = inner(*args, **kwargs)
            self.part[key] += time.process_time() - start
            return out

        setattr(self.model, name, timed)

    def run(self, llm: LLM, prompt: list[int], max_tokens: int) -> list[int]:
        engine = llm.engine
        engine.add_request(f"r{time.monotonic_ns()}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        tokens: list[int] = []
        first = True
        while engine.has_unfinished_requests():
            self.part = {"forward": 0.0, "head": 0.0}
            start = time.process_time()
            outs = engine.step()
            total = time.process_time() - start
            for out in outs:
                tokens = list(out.outputs[0].token_ids)
            if first:  # the prefill
                first = False
                continue
            self.steps.setdefault(self.rows, []).append({"total": total, **self.part})
        return tokens


def micro(model: torch.nn.Module, rows: int, repeats: int) -> dict[str, float]:
    """Median CPU ms of all decoder projections, and of the LM head, on `rows` rows alone."""
    projections = []
    for layer in model.model.own_layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
    inputs = [torch.randn(rows, p.quant_method.runtime.packed.k) for p in projections]
    head = getattr(model, "cpu_lm_head", None)
    hidden = torch.randn(rows, inputs[0].shape[1])

    def clock(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return statistics.median(times) * 1e3

    matmuls = clock(lambda: [p.quant_method.runtime(x, p.bias) for p, x in zip(projections, inputs, strict=True)])
    return {"matmuls": matmuls, "head": clock(lambda: head(hidden)) if head is not None else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-activations", default="float", choices=["float", "int8"])
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="micro-benchmark calls per row count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    llm = LLM("default", quantization="gguf", async_scheduling=False, cpu_activations=args.cpu_activations,
              speculative={"method": "ngram", "num_speculative_tokens": max(ks)})
    oracle = OracleProposer()
    speculator = llm.engine.speculator
    speculator.proposer = oracle
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": TASKS["edit-code"]}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    clock = StepClock(llm)
    oracle.off = True
    clock.run(llm, prompt, args.tokens)  # warm-up; later runs hit the prefix cache, as this one did not
    clock.steps = {}
    oracle.want = clock.run(llm, prompt, args.tokens)  # the plain steps, and the continuation to draft
    oracle.off = False
    for k in ks:
        speculator.k = k
        speculator._k_of.clear()
        got = clock.run(llm, prompt, args.tokens)
        assert got == oracle.want, "greedy outputs differ with speculation"
    print(f"CPU: {cpu_model_name()}, kernels {best_isa()}, torch threads {torch.get_num_threads()}, "
          f"cpu_activations {args.cpu_activations}; CPU time (process_time), medians")
    plain = statistics.median(s["total"] for s in clock.steps[1]) * 1e3
    print(f"{'rows':>4} {'steps':>5} {'step ms':>8} {'x plain':>7} {'forward':>8} {'head':>6} {'other':>6} "
          f"{'| matmuls':>9} {'head':>6} {'attn+rest':>9}")
    for rows in sorted(clock.steps):
        steps = clock.steps[rows]
        if rows != 1 and rows - 1 not in ks:
            continue  # the tail of a run (fewer tokens left than k)
        med = {key: statistics.median(s[key] for s in steps) * 1e3 for key in ("total", "forward", "head")}
        other = statistics.median((s["total"] - s["forward"] - s["head"]) for s in steps) * 1e3
        m = micro(clock.model, rows, args.repeats)
        print(f"{rows:>4} {len(steps):>5} {med['total']:>8.2f} {med['total'] / plain:>7.2f} {med['forward']:>8.2f} "
              f"{med['head']:>6.2f} {other:>6.2f} | {m['matmuls']:>7.2f} {m['head']:>6.2f} "
              f"{med['forward'] - m['matmuls']:>9.2f}")


if __name__ == "__main__":
    main()
