"""`shardserve eval perplexity`: the quality of a model (quantized or not) on a text file.

Checks the flags first (a missing file, window < 2 or stride outside [1, window]: a message
naming the flag, exit code 2, before any model loads), builds one LLMEngine per model with
--quantization / --cpu-activations / --dtype / --device passed through to ModelConfig (a value the engine refuses is
reported the same way; --cpu-activations defaults to float here, not the engine's auto, and the
reference always runs float), tokenizes the text once with the model's tokenizer, and hands the
windows to workers/eval/perplexity.py. Prints a short table, or with --json exactly
{"perplexity", "kl", "top1", "tokens"} (kl and top1 null without --reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="measure model quality")
    kinds = p.add_subparsers(dest="eval_kind", required=True, metavar="{perplexity}")
    q = kinds.add_parser("perplexity", help="perplexity on a text; KL and top-1 agreement against a reference")
    q.add_argument("--model", default="default", help="HF folder, file.gguf, dummy:NAME or default (SmolLM2)")
    q.add_argument("--quantization", default=None, help="weight quantization of --model (engine ModelConfig)")
    q.add_argument("--quantization-group-size", type=int, default=128, help="inputs per scale for int4 at load")
    q.add_argument("--cpu-activations", default="float",
                   help="float (default here: the exact matmuls) | int8 | auto: how the quantized CPU kernels meet "
                        "the activations of --model (ModelConfig.cpu_activations; --reference always float)")
    q.add_argument("--text", required=True, help="UTF-8 text file to score")
    q.add_argument("--reference", default=None, help="reference model: report KL(reference || model) and top-1")
    q.add_argument("--reference-quantization", default=None, help="weight quantization of --reference")
    q.add_argument("--reference-dtype", default=None, help="dtype of --reference (default: --dtype)")
    q.add_argument("--window", type=int, default=512, help="tokens per window (>= 2)")
    q.add_argument("--stride", type=int, default=256, help="tokens a window advances (1..window)")
    q.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens (>= 2)")
    q.add_argument("--json", action="store_true", help='print {"perplexity", "kl", "top1", "tokens"} only')
    q.add_argument("--dtype", default="auto")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"shardserve eval perplexity: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from shardserve.workers.config import EngineConfig, ModelConfig
    from shardserve.workers.engine import LLMEngine
    from shardserve.workers.eval.perplexity import check_window, evaluate_perplexity

    try:
        check_window(args.window, args.stride)
        if args.max_tokens is not None and args.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {args.max_tokens}")
        text = _read_text(Path(args.text))
        model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                                   quantization=args.quantization,
                                   quantization_group_size=args.quantization_group_size,
                                   cpu_activations=args.cpu_activations)
        reference_config = None
        if args.reference is not None:
            reference_config = ModelConfig(model=args.reference, dtype=args.reference_dtype or args.dtype,
                                           device=args.device, quantization=args.reference_quantization,
                                           cpu_activations="float")
    except ValueError as exc:
        return _fail(str(exc))

    try:  # a model that is not there, or a config the engine refuses at load
        model = LLMEngine(EngineConfig(model=model_config), progress=True)
        reference = None
        if reference_config is not None:
            reference = LLMEngine(EngineConfig(model=reference_config), progress=True)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    token_ids = model.tokenize(text)[: args.max_tokens]
    if reference is not None and reference.tokenize(text)[: args.max_tokens] != token_ids:
        return _fail(f"--reference {args.reference} tokenizes the text differently from --model {args.model}: "
                     "KL and top-1 need the same tokens")
    try:
        result = evaluate_perplexity(model, token_ids, args.window, args.stride, reference, progress=True)
    except ValueError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    rows = [("model", args.model + (f" ({args.quantization})" if args.quantization else "")),
            ("tokens scored", f"{result.tokens} (window {args.window}, stride {args.stride})"),
            ("perplexity", f"{result.perplexity:.4f}")]
    if reference is not None:
        rows += [("reference", args.reference), ("KL(ref || model)", f"{result.kl:.6f} nats/token"),
                 ("top-1 agreement", f"{100 * result.top1:.2f} %")]
    for name, value in rows:
        print(f"{name:<18} {value}")
    return 0


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--text {path}: cannot read it as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ValueError(f"--text {path}: the file is empty")
    return text
