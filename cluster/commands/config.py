"""`shardserve config schema | helm-schema | validate FILE...`: the config's schemas, and checking files.

Data flow: `schema` prints `ServeConfig`'s JSON Schema (cluster/config.py, the only parser);
`helm-schema` prints (or with `--write` rewrites) the Helm chart's values.schema.json generated
from the same models (cluster/helm_schema.py); `validate` loads each file with `load_config`,
which runs the engine's own checks, and prints either a one-line summary per model or the errors,
each naming the path of the bad field. No Ray import.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="Print the config JSON Schema or validate config files.")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("schema", help="Print the JSON Schema of a serve config file.")
    helm = actions.add_parser("helm-schema", help="Print (or --write) the Helm chart's values.schema.json.")
    helm.add_argument("--chart", default="helm/shardserve", help="chart folder (holds values.schema.base.json)")
    helm.add_argument("--write", action="store_true", help="rewrite CHART/values.schema.json instead of printing")
    validate = actions.add_parser("validate", help="Validate serve config files.")
    validate.add_argument("files", nargs="+", metavar="FILE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shardserve.cluster.config import ConfigError, json_schema, load_config

    if args.action == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.action == "helm-schema":
        from shardserve.cluster.helm_schema import SCHEMA_NAME, render

        text = render(Path(args.chart))
        if args.write:
            (Path(args.chart) / SCHEMA_NAME).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    status = 0
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as err:
            print(f"invalid: {err}", file=sys.stderr)
            status = 1
            continue
        for m in config.models:
            scaling = (
                f"autoscaling {m.autoscaling.min_replicas}..{m.autoscaling.max_replicas}"
                if m.autoscaling
                else f"{m.num_replicas} replica(s)"
            )
            p = m.parallel
            print(
                f"ok: {path}: model {m.name!r} source={m.source} tp={p.tensor_parallel_size} "
                f"pp={p.pipeline_parallel_size} ep={p.expert_parallel_size} {scaling}"
            )
    return status
