"""`shardserve generate`: one prompt, streamed to the terminal — the one-command local run.

Loads the model (with a progress bar), builds SamplingParams and the EngineConfig from the flags
(engine flags are generated from workers/config.py: cluster/commands/engine_flags.py; a bad
value is reported with the field and its range, exit code 2), then steps the engine and
prints each output's new text as it arrives, followed by a one-line timing summary on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from shardserve.cluster.commands.engine_flags import add_engine_flags, engine_config_from_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from one prompt, streamed")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (the model's: --model-seed)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    add_engine_flags(p, renames={"seed": "model_seed"})  # --model, --dtype, --tensor-parallel-size, ...
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shardserve.workers.engine import LLMEngine
    from shardserve.workers.request import SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens,
            min_tokens=args.min_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
        )
        config = engine_config_from_flags(args)
    except ValueError as exc:
        print(f"shardserve generate: {exc}", file=sys.stderr)
        return 2

    engine = LLMEngine(config, progress=True)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    try:
        engine.add_request("cli", prompt, params)
    except ValueError as exc:
        print(f"shardserve generate: {exc}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].new_text)
            sys.stdout.flush()
            if out.finished:
                final = out
    elapsed = time.perf_counter() - start
    completion = final.outputs[0]
    metrics = final.metrics
    num_tokens = len(completion.token_ids)
    print(
        f"\n[{num_tokens} tokens in {elapsed:.2f}s, {num_tokens / elapsed:.1f} tok/s, "
        f"TTFT {metrics.ttft * 1000:.0f} ms, finish: {completion.finish_reason.value}]",
        file=sys.stderr,
    )
    return 0
