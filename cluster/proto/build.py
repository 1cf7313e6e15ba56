"""Generate the Python gRPC stubs of cluster/proto/shardserve/v1/*.proto into cluster/proto/gen/.

Data flow: grpcio-tools' protoc reads the .proto files under this folder and writes
`llm_pb2.py`, `llm_pb2.pyi` and `llm_pb2_grpc.py` into a temporary folder; the generated
absolute import (`from shardserve.v1 import llm_pb2`) is rewritten to a relative one so the
stubs import as `shardserve.cluster.proto.gen.shardserve.v1`, the generated runtime-version
guards are dropped (so the stubs also import under an older grpcio / protobuf), and the folder is renamed into
place atomically (several processes may build at once). `gen/` is git-ignored: `make proto`
runs this at install time and `shardserve.cluster.proto` reruns it when a .proto is newer.

    python -m shardserve.cluster.proto.build
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GEN_DIR = PROTO_ROOT / "gen"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("shardserve/**/*.proto"))


def is_stale() -> bool:
    stamp = GEN_DIR / "shardserve" / "v1" / "llm_pb2_grpc.py"
    if not stamp.exists():
        return True
    return any(p.stat().st_mtime > stamp.stat().st_mtime for p in proto_files())


# The guards newer protoc / grpcio-tools write refuse to import under an older runtime, even
# though these stubs use nothing newer than protobuf 4.21 / grpcio 1.62 offer: stubs built here
# must also run where another grpcio / protobuf is installed (the GPU image has grpcio 1.84).
_PROTOBUF_GUARD = re.compile(
    r"^from google\.protobuf import runtime_version as _runtime_version\n"
    r"|^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:^[ \t].*\n)*?^\)\n",
    re.M,
)
_GRPC_GUARD = re.compile(r"^GRPC_GENERATED_VERSION = .*?^    \)\n", re.M | re.S)


def _drop_version_guards(text: str) -> str:
    return _GRPC_GUARD.sub("", _PROTOBUF_GUARD.sub("", text))


def build() -> Path:
    try:
        from grpc_tools import protoc
    except ImportError as err:
        raise RuntimeError(
            "gRPC stubs are missing and grpcio-tools is not installed: pip install grpcio-tools, "
            "then run `python -m shardserve.cluster.proto.build` (make proto)"
        ) from err
    include = Path(protoc.__file__).resolve().parent / "_proto"
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=PROTO_ROOT))
    try:
        rel = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
        code = protoc.main([*args, f"--grpc_python_out={tmp}", *rel])
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code} on {rel}")
        for folder in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
            (folder / "__init__.py").touch()
        for stub in tmp.rglob("*_pb2_grpc.py"):
            text = stub.read_text().replace("from shardserve.v1 import ", "from . import ")
            stub.write_text(_drop_version_guards(text))
        for stub in tmp.rglob("*_pb2.py"):
            # Message classes must name their real module, or pickling them (Ray does) fails.
            text = re.sub(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'[^']+'", r"\1__name__", stub.read_text())
            stub.write_text(_drop_version_guards(text))
        old = PROTO_ROOT / f".old-{os.getpid()}"
        if GEN_DIR.exists():
            GEN_DIR.rename(old)
        try:
            tmp.rename(GEN_DIR)
        except OSError:
            if not GEN_DIR.exists():  # nobody else won the race: put the old stubs back
                old.rename(GEN_DIR)
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GEN_DIR


def main() -> int:
    out = build()
    print(f"generated gRPC stubs for {len(proto_files())} .proto file(s) in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
