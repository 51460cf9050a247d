"""Two JAX processes on localhost (gloo CPU collectives) train exactly like one process with all devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    return subprocess.Popen([sys.executable, "-m", "tests.parallel.multiprocess_worker", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(process):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return json.loads(next(line for line in output.splitlines() if line.startswith("LOSSES "))[7:])


@pytest.mark.slow
def test_two_processes_match_one():
    port = _free_port()
    workers = [_start("--num-processes", "2", "--process-id", str(i), "--port", str(port), "--devices", "2")
               for i in range(2)]
    single = _start("--devices", "4")
    two = [_losses(w) for w in workers]
    one = _losses(single)
    assert two[0] == two[1]
    assert len(one) == 3 and one[2] < one[0], one
    for a, b in zip(two[0], one):
        assert abs(a - b) <= 1e-5 * abs(b), (two[0], one)
