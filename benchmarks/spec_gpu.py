"""One device call: what speculative decoding costs and gives on one GPU (issue 23's GPU targets).

Data flow: (1) Verify-step cost, Llama-3.1-8B shape (dummy weights, bf16): a plain engine and one
whose scheduler drafts k tokens for every decoding request (the proposer below always proposes
k tokens, so every decode step is a verify step of 1 + k tokens: the worst case, whatever is
accepted) run the same batch-1 request of 16 in / 128 out; the median CUDA-event time of their
decode steps gives verify / plain (target <= 1.15 at k = 4); the verify engine runs once per
`--verify-paths` entry: `decode` (verify steps as decode rows, the default) and `mixed` (forced
onto the mixed-step graphs, the old path), side by side on one warm GPU. (2) Under load: batch 16, 32, 64
decode (16 in / 256 out), plain vs the n-gram engine with its default adaptive switch
(max_verify_tokens 128): the switch must leave throughput at >= 0.97x plain where the batch is
large. (3) With `--smollm2 PATH` (the embedded GGUF, carried to the device), `bench latency
--speculative-method ngram` and `suffix` (and `--methods draft,draft24,draft-gguf`: the draft-model
proposer with SmolLM2, its first 24 layers, its packed copy) on the repetitive tasks: batch-1 speedup and acceptance
with real text. Logs and a JSON go to $OUT; the last lines are the table with the device name.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from dataclasses import replace

import torch
from shardserve.workers.bench.device import copy_bandwidth, device_name
from shardserve.workers.bench.runs import run_latency
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.spec.speculator import Speculator


class AlwaysK:
    """Benchmark proposer: k copies of the last token for every request (verify steps every step)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, request_id, token_ids, num_prompt_tokens, max_tokens):
        return [token_ids[-1]] * min(self.k, max_tokens)

    def finish(self, request_id, token_ids, num_prompt_tokens):
        pass


class FixedK(Speculator):
    """Every decoding request drafts k tokens every step: the per-request k adaptation and the pause
    after rejected drafts are undone after each verify (with random weights most drafts are rejected,
    and without this most steps of the verify run would be plain decode steps)."""

    def record(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        super().record(request_id, num_drafts, num_accepted)
        self._k_of.pop(request_id, None)
        self._rejected.pop(request_id, None)
        self._paused_until.pop(request_id, None)


def engine(model: str, spec: SpeculativeConfig | None, always: int = 0) -> LLMEngine:
    config = EngineConfig(model=ModelConfig(model=model), scheduler=SchedulerConfig(max_num_seqs=256))
    if spec is not None:
        config = replace(config, speculative=spec)
    eng = LLMEngine(config)
    if always:  # swap in the always-propose proposer (same Speculator, same scheduler path)
        eng.speculator = FixedK(spec, proposer=AlwaysK(always))
        eng.scheduler.speculator = eng.speculator
    return eng


def decode_gpu_ms(eng: LLMEngine, vocab: int, bandwidth: float) -> tuple[float, float, int]:
    """(median GPU ms of the decode steps, decode tok/s, verify steps run as decode rows) of one
    batch-1 request, 16 in / 128 out."""
    run_latency(eng, Workload(1, 16, 32, seed=1).sample(vocab), bandwidth)  # warm-up
    result = run_latency(eng, Workload(1, 16, 128, seed=2).sample(vocab), bandwidth)
    return result.gpu_ms_per_step, result.decode_tokens_per_s, eng.runner.step_times.verify_decode_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-sizes", default="16,32,64")
    parser.add_argument("--smollm2", default=None, help="path of the SmolLM2 GGUF (repetitive-task speedups)")
    parser.add_argument("--methods", default="ngram,suffix",
                        help="proposers run on SmolLM2: ngram, suffix, draft (SmolLM2 drafts for itself), draftN "
                             "(its first N layers), draft-gguf (its packed Q4_1 copy)")
    parser.add_argument("--output-len", type=int, default=256, help="SmolLM2 task outputs at most")
    parser.add_argument("--verify-paths", default="decode,mixed",
                        help="verify-step paths timed: decode (verify tokens as decode rows), mixed (the mixed-step "
                             "graphs, forced)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["verify", "load", "smollm2"])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    bad = set(args.verify_paths.split(",")) - {"decode", "mixed"}
    if bad:
        parser.error(f"--verify-paths takes decode and/or mixed, got {sorted(bad)}")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    name, bandwidth = device_name(device), copy_bandwidth(device)
    print(f"device {name}; torch {torch.__version__}", flush=True)
    summary: dict = {"device": name, "args": vars(args)}
    ngram = SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=args.k)
    if "verify" not in args.skip or "load" not in args.skip:
        plain = engine(args.model, None)
        vocab = plain.loaded.hf_config.vocab_size
        if "verify" not in args.skip:
            summary["plain_b1"] = decode_gpu_ms(plain, vocab, bandwidth)
        if "load" not in args.skip:
            for b in (int(x) for x in args.batch_sizes.split(",")):
                r = run_latency(plain, Workload(b, 16, 256, seed=b).sample(vocab), bandwidth)
                summary[f"plain_b{b}"] = r.decode_tokens_per_s
                print(f"plain b{b}: {r.decode_tokens_per_s:.0f} tok/s", flush=True)
        plain.shutdown()
        del plain
        torch.cuda.empty_cache()
    if "verify" not in args.skip:
        always = engine(args.model, replace(ngram, max_verify_tokens=1 << 20), always=args.k)
        for path in args.verify_paths.split(","):
            always.runner.set_verify_as_decode(path == "decode")
            summary[f"verify_b1_{path}"] = decode_gpu_ms(always, vocab, bandwidth)
            ms, _, as_decode = summary[f"verify_b1_{path}"]
            summary[f"verify_b1_{path}_drafts"] = always.speculator.stats.num_drafts
            print(f"verify k={args.k} ({path} path, {as_decode} steps as decode rows, "
                  f"{always.speculator.stats.num_drafts} drafts verified so far): {ms:.3f} ms vs plain "
                  f"{summary['plain_b1'][0]:.3f} ms", flush=True)
        always.shutdown()
        del always
        torch.cuda.empty_cache()
    if "load" not in args.skip:
        spec = engine(args.model, ngram)
        for b in (int(x) for x in args.batch_sizes.split(",")):
            r = run_latency(spec, Workload(b, 16, 256, seed=b).sample(vocab), bandwidth)
            summary[f"ngram_b{b}"] = r.decode_tokens_per_s
            print(f"ngram b{b}: {r.decode_tokens_per_s:.0f} tok/s", flush=True)
        summary["ngram_stats"] = str(spec.stats().spec_decode)
        spec.shutdown()
        del spec
    gc.collect()
    torch.cuda.empty_cache()  # the SmolLM2 runs are subprocesses that size their KV cache from free memory
    if args.smollm2 and "smollm2" not in args.skip:
        for method in args.methods.split(","):
            path = os.path.join(args.out, f"smollm2-{method}.json")
            proc = subprocess.run([sys.executable, "-m", "shardserve.cluster.cli", "bench", "latency", "--model",
                                   args.smollm2, "--device", "cuda", *_method_flags(method, args.smollm2),
                                   "--output-len", str(args.output_len), "--json", path], capture_output=True, text=True)
            with open(os.path.join(args.out, f"smollm2-{method}.log"), "w") as f:
                f.write(proc.stdout + proc.stderr)
            print(proc.stdout[-1500:], proc.stderr[-1500:] if proc.returncode else "", flush=True)
            if proc.returncode == 0:
                with open(path) as f:
                    summary[f"smollm2_{method}"] = json.load(f)
    with open(os.path.join(args.out, "spec_gpu.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"\n{name}, {args.model}, k = {args.k}")
    for path in args.verify_paths.split(","):
        if f"verify_b1_{path}" in summary:
            p_ms, v_ms = summary["plain_b1"][0], summary[f"verify_b1_{path}"][0]
            print(f"batch-1 decode step {p_ms:.3f} ms, verify step (1 + {args.k} tokens, {path} path) {v_ms:.3f} ms: "
                  f"{v_ms / p_ms:.3f}x (target <= 1.15)")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        if f"ngram_b{b}" in summary:
            print(f"batch {b}: plain {summary[f'plain_b{b}']:.0f}, ngram {summary[f'ngram_b{b}']:.0f} tok/s: "
                  f"{summary[f'ngram_b{b}'] / summary[f'plain_b{b}']:.3f}x")
    for method in args.methods.split(","):
        run = summary.get(f"smollm2_{method}")
        if run:
            print(f"SmolLM2 {method}: speedup {run['speedup_geomean']:.2f}x, acceptance "
                  f"{run['spec_decode']['acceptance_rate']:.0%}")
    print(f"n-gram engine statistics under load: {summary.get('ngram_stats', '')[:200]}")


def _method_flags(method: str, smollm2: str) -> list[str]:
    """`bench latency` flags of a --methods entry: ngram | suffix | draft | draftN | draft-gguf."""
    if not method.startswith("draft"):
        return ["--speculative-method", method]
    flags = ["--speculative-method", "draft", "--draft-model", smollm2]
    if method == "draft-gguf":
        return [*flags, "--draft-quantization", "gguf"]
    return [*flags, "--draft-num-layers", method[len("draft"):]] if method != "draft" else flags


if __name__ == "__main__":
    main()
