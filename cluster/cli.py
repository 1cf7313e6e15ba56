"""`shardserve` command line: dispatches to one module per subcommand.

    shardserve generate --model default --prompt "Hi" [--chat] [sampling flags]
    shardserve serve configs/cpu-default.yaml
    shardserve config schema | shardserve config validate FILE
    shardserve bench latency|throughput ...   |   shardserve bench serve --endpoint URL --model M ... (online load)
    shardserve eval perplexity --model M --text FILE [--reference M2] [--json]
    shardserve probe https://127.0.0.1:8000/health --cert tls.crt --key tls.key   (Kubernetes exec probe)
    shardserve quantize --model default --method gptq --calib FILE --out DIR

Each module in cluster/commands/ exposes `register(subparsers)`, which adds its parser and sets
`func` to the function that runs it. Modules are imported only for the command that runs,
so `shardserve generate` never imports Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under shardserve.cluster.commands
COMMANDS = {
    "generate": "generate",
    "serve": "serve",
    "config": "config",
    "bench": "bench",
    "eval": "eval",
    "probe": "probe",
    "quantize": "quantize",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", description="Serve LLMs on a Ray cluster.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            # Register a placeholder so `--help` lists every command without importing them all.
            subparsers.add_parser(name)
            continue
        importlib.import_module(f"shardserve.cluster.commands.{module}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    if command not in COMMANDS:
        parser.parse_args(argv)  # prints usage / help and exits
        return 2
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
