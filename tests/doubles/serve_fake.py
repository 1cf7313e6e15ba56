"""`shardserve serve CONFIG.yaml` with every model on a FakeEngine, for tests that need the real command.

    python tests/doubles/serve_fake.py CONFIG.yaml [--num-cpus N]

The arguments are the `serve` command's own (its parser from shardserve.cluster.cli); the only
difference is `engine_factory`, passed from Python to `serve.run(args, engine_factory)`, which a
config file cannot do. tests/cluster/test_tls.py runs it in a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the `doubles` package

from shardserve.cluster.cli import build_parser  # noqa: E402
from shardserve.cluster.commands import serve  # noqa: E402

from doubles import engine_factory, fake_engine  # noqa: E402


def main(argv: list[str]) -> int:
    args = build_parser(only="serve").parse_args(["serve", *argv])
    return serve.run(args, engine_factory(fake_engine))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
