"""`shardserve serve configs/cpu-default.yaml` — what `make serve` runs — as a user runs it.

Starts the command as a subprocess (its own local Ray, the embedded SmolLM2 on CPU) on free
ports, waits for it to print that it is up, calls the HTTP API with the `openai` client and the
gRPC API with the exact one-liner the command printed, then stops it with SIGINT and checks it
exits cleanly.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml
from ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]


def test_serve_default_config_end_to_end(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "cpu-default.yaml").read_text())
    http_port = free_port()
    grpc_port = free_port(taken=(http_port,))
    config["http"]["port"], config["grpc"]["port"] = http_port, grpc_port
    config["ray"]["namespace"] = "shardserve-serve-cmd-test"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    shardserve = Path(sys.executable).parent / "shardserve"
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 -- the server outlives any with-block here
    proc = subprocess.Popen([str(shardserve), "serve", str(path), "--num-cpus", "4"], stdout=log,
                            stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)
    try:
        deadline = time.time() + 300
        while "shardserve is up" not in (text := (tmp_path / "serve.log").read_text()):
            assert proc.poll() is None, f"serve exited early:\n{text[-3000:]}"
            assert time.time() < deadline, f"serve did not come up:\n{text[-3000:]}"
            time.sleep(1)

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0,
        )
        assert "Paris" in chat.choices[0].message.content

        # The banner's gRPC example runs the interpreter that runs shardserve (its virtual environment).
        grpc_line = next(line.strip() for line in text.splitlines() if line.strip().startswith(f"{sys.executable} -c"))
        argv = shlex.split(grpc_line)
        argv[0] = sys.executable
        argv[-1] = argv[-1].replace("localhost", "127.0.0.1")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "the printed gRPC command returned no text"
        assert re.search(rf"curl http://localhost:{http_port}/v1/chat/completions", text)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
