"""The import contracts of pyproject.toml (checked by `lint-imports` in `make test`) stay complete.

tests/ and benchmarks/ are not packages, so the contract "product code never imports tests or
benchmarks" has to name every top-level module they offer: each helper module of tests/ (what is
not a test file), each package there (tests/doubles), each script of benchmarks/. A module added
there without its name in the contract would be importable from the product unnoticed: this
fails first. The contracts themselves are the linter's to check, not this file's.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _contract(name_start: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c["name"].startswith(name_start))


def _top_level_names() -> set[str]:
    names = {"tests", "benchmarks"}
    for path in (ROOT / "tests").rglob("*.py"):
        if "doubles" in path.relative_to(ROOT / "tests").parts:
            continue  # one package: `doubles`, added below
        if not path.name.startswith("test_"):
            names.add(path.stem)
    names |= {p.parent.name for p in (ROOT / "tests").glob("*/__init__.py")}
    names |= {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    return names


def test_every_tests_and_benchmarks_module_is_forbidden_to_the_product():
    contract = _contract("Product code never imports tests or benchmarks")
    assert contract["type"] == "forbidden"
    assert set(contract["source_modules"]) == {"shardserve.cluster", "shardserve.workers", "shardserve.parallel"}
    missing = sorted(_top_level_names() - set(contract["forbidden_modules"]))
    assert not missing, f"add these to the forbidden contract in pyproject.toml: {missing}"
    assert "doubles" in _top_level_names()  # the walk above sees the tests' packages

