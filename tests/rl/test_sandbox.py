"""cascade_jax.rl.sandbox: hostile programs fail within their limits, in both isolation modes, leave the host
healthy and leave no process behind (found by a token in their command lines: each program re-execs itself
with the token as its last argument, and its children carry it too)."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import venv
from pathlib import Path

import pytest

from cascade_jax.rl import sandbox, sandbox_programs
from cascade_jax.rl.sandbox import SandboxLimits, code_reward, run_python, run_tests

REPO = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=3, memory_bytes=512 << 20, max_processes=16,
                       max_output_bytes=64 << 10)
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=1.5, memory_bytes=512 << 20, max_processes=16,
                     max_output_bytes=64 << 10)
MARGIN_S = 2.0
NO_ROOT = "import os, sys\nif os.getuid() == 0:\n    sys.exit('refusing to attack as root')\n"


@pytest.fixture(params=["bwrap", "rlimits"])
def mode(request):
    if request.param == "bwrap":
        _require_bwrap(None)
    return request.param


def _require_bwrap(python):
    """Skip where bwrap is missing or the kernel forbids its namespaces; any other probe failure is a bug."""
    try:
        sandbox._resolve_isolation("bwrap", sandbox._interpreter(python))
    except RuntimeError as e:
        if shutil.which("bwrap") is None or "not permitted" in str(e).lower() or "permission" in str(e).lower():
            pytest.skip(f"bwrap unavailable: {e}")
        raise


def test_bwrap_runs_an_interpreter_that_lives_under_tmp(tmp_path):
    """A checkout (and its venv) under /tmp stays visible under the sandbox's private /tmp."""
    venv.create(tmp_path / "venv", symlinks=False, with_pip=False)
    python = str(tmp_path / "venv" / "bin" / "python")
    _require_bwrap(python)
    result = run_python("print(6 * 7)", python=python, limits=LIMITS, isolation="bwrap")
    assert (result.returncode, result.stdout) == (0, "42\n"), result.stderr


def _tokened(token: str, body: str) -> str:
    """``body`` run as a process whose command line ends with ``token``."""
    return (f"import os, sys\nif sys.argv[-1] != {token!r}:\n"
            f"    os.execv(sys.executable, [sys.executable, '-I', '-S', os.path.abspath(__file__), {token!r}])\n"
            + body)


def _alive(token: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline:
                found.append(f"{pid}: {cmdline.replace(b'\0', b' ')[:120]!r}")
    return found


def _attack(mode: str, body: str, limits: SandboxLimits = LIMITS, **kwargs):
    """Runs ``body`` (tokened) in ``mode``; checks the time bound, the host and that nothing of it is left."""
    token = "cascade-sandbox-test-" + secrets.token_hex(8)
    start = time.monotonic()
    result = run_python(_tokened(token, NO_ROOT + body), limits=limits, isolation=mode, **kwargs)
    elapsed = time.monotonic() - start
    assert _alive(token) == [], "processes of the attempt survived"
    assert elapsed < limits.wall_seconds + MARGIN_S, elapsed
    assert result.isolation == mode
    assert subprocess.run(["true"]).returncode == 0          # the host can still start processes
    os.kill(os.getppid(), 0)                                 # and its parent is alive
    return result, elapsed, token


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ValueError, match="max_processes"):
        SandboxLimits(max_processes=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=1.5)


def test_bwrap_forced_but_missing(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="not installed"):
        run_python("pass", isolation="bwrap")
    with pytest.raises(ValueError, match="isolation"):
        run_python("pass", isolation="docker")


def test_stdin_stdout_and_exit_status(mode):
    result = run_python("import sys\nprint(input()[::-1])\nprint('err', file=sys.stderr)\nsys.exit(3)",
                        stdin="olleh\n", limits=LIMITS, isolation=mode)
    assert (result.returncode, result.stdout, result.stderr) == (3, "hello\n", "err\n")
    assert not result.timed_out and not result.output_truncated


def test_infinite_loop_hits_the_cpu_limit(mode):
    result, elapsed, _ = _attack(mode, "while True:\n    pass\n")
    assert result.returncode != 0 or result.timed_out


def test_sleep_hits_the_wall_limit(mode):
    result, elapsed, _ = _attack(mode, "import time\ntime.sleep(100)\n")
    assert result.timed_out and result.returncode is None
    assert elapsed >= LIMITS.wall_seconds


def test_fork_bomb_is_bounded(mode):
    result, _, _ = _attack(mode, "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert result.timed_out or result.returncode != 0


def test_huge_allocation_fails(mode):
    result, _, _ = _attack(mode, "x = bytearray(10 * 2**30)\n")
    assert result.returncode != 0 and "MemoryError" in result.stderr


def test_writes_outside_its_directory_do_not_reach_the_host(mode):
    token = secrets.token_hex(8)
    targets = [REPO / f"evil_{token}", Path.home() / f"evil_{token}", Path("/etc") / f"evil_{token}"]
    if mode == "bwrap":
        targets.append(Path("/tmp") / f"evil_{token}")       # the fallback shares the host's /tmp
    body = (f"for path in {[str(t) for t in targets]!r}:\n    try:\n        open(path, 'w').write('x')\n"
            "        print('wrote', path)\n    except OSError as e:\n        print('refused', path)\n"
            "open('inside.txt', 'w').write('fine')\nprint('inside ok')\n")
    try:
        result, _, _ = _attack(mode, body)
        assert result.returncode == 0 and "inside ok" in result.stdout
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_network_is_blocked(mode, request):
    if mode == "rlimits":
        request.applymarker(pytest.mark.xfail(strict=True, reason="the rlimits fallback does not block the network "
                                              "(documented)"))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.settimeout(0.3)
        port = server.getsockname()[1]
        body = ("import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
                "    print('CONNECTED')\nexcept OSError as e:\n    print('FAILED', e)\n")
        result, _, _ = _attack(mode, body)
        try:
            connection, _ = server.accept()
            connection.close()
            reached = True
        except TimeoutError:
            reached = False
    assert "FAILED" in result.stdout and not reached


def test_output_flood_is_capped(mode):
    result, _, _ = _attack(mode, "while True:\n    sys.stdout.write('x' * 2**20)\n")
    assert result.output_truncated and result.returncode is None
    assert len(result.stdout) + len(result.stderr) <= LIMITS.max_output_bytes


def test_killing_the_host_fails(mode):
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        body = ("import signal\ndef attempt(f):\n    try:\n        f()\n    except OSError:\n        pass\n"
                "attempt(lambda: os.kill(os.getppid(), signal.SIGKILL))\n"
                "attempt(lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL))\n"
                "for pid in os.listdir('/proc'):\n"
                "    if pid.isdigit() and int(pid) != os.getpid():\n"
                "        attempt(lambda: os.kill(int(pid), signal.SIGKILL))\n"
                "attempt(lambda: os.kill(-1, signal.SIGKILL))\nprint('done')\n")
        _attack(mode, body)
        assert sentinel.poll() is None, "a process of the host was killed"
    finally:
        sentinel.kill()
        sentinel.wait()


def test_background_children_do_not_outlive_the_attempt(mode):
    body = ("import subprocess\nsleeper = [sys.executable, '-I', '-S', '-c', 'import time; time.sleep(100)', "
            "sys.argv[-1]]\nsubprocess.Popen(sleeper)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execv(sleeper[0], sleeper)\n"
            "    os._exit(0)\nprint('parent exits')\n")
    result, elapsed, _ = _attack(mode, body)
    assert result.returncode == 0 and "parent exits" in result.stdout
    assert elapsed < 2.0, "the call waited for the background children"


def test_rewards(mode):
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    reward, details = code_reward("def add(a, b):\n    return a + b\n", tests, limits=LIMITS, isolation=mode)
    assert reward == 1.0 and details["passed"] == 2 and details["total"] == 2 and details["isolation"] == mode
    failing = {
        "wrong": "def add(a, b):\n    return a - b\n",
        "syntax error": "def add(a, b)\n    return a + b\n",
        "raises": "def add(a, b):\n    return a + b\nraise RuntimeError('boom')\n",
        "exits early": "import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)\n",
        "forged report": ("import os\ndef add(a, b):\n    return 0\n"
                          "for fd in os.listdir('/proc/self/fd'):\n    try:\n"
                          "        os.write(int(fd), b'0 2 2\\n')\n    except OSError:\n        pass\n"),
    }
    for name, code in failing.items():
        reward, details = code_reward(code, tests, limits=LIMITS, isolation=mode)
        assert reward == 0.0, name
    assert code_reward("def add(a, b):\n    return a + b\n", [], limits=LIMITS, isolation=mode)[0] == 0.0


@pytest.mark.parametrize("attack", ["while True:\n    pass\n",
                                    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                                    "        pass\n",
                                    "x = bytearray(10 * 2**30)\n",
                                    "import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n"],
                         ids=["loop", "fork bomb", "allocation", "output flood"])
def test_attacks_get_no_reward(mode, attack):
    start = time.monotonic()
    reward, details = code_reward(NO_ROOT + attack + "def f():\n    return 1\n", ["assert f() == 1"],
                                  limits=FAST, isolation=mode)
    assert reward == 0.0 and details["passed"] == 0
    assert time.monotonic() - start < FAST.wall_seconds + MARGIN_S


def test_run_tests_is_a_drop_in(mode):
    code = "def f(x):\n    return 2 * x\n"
    assert run_tests(code, ["assert f(2) == 4", "assert f(3) == 7"], 5.0, isolation=mode) == (1, 2)
    assert run_tests(code, [], isolation=mode) == (0, 0)
    assert run_tests("import time\ntime.sleep(100)\n", ["assert True"], 1.0, isolation=mode) == (0, 1)


def test_threads_at_once(mode):
    results = {}

    def work(i):
        results[i] = run_python(f"import time\ntime.sleep(0.2)\nprint({i} * {i})", limits=LIMITS, isolation=mode)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: (r.returncode, r.stdout) for i, r in results.items()} == {i: (0, f"{i * i}\n") for i in range(4)}


def test_module_does_not_import_jax():
    # Loaded from their files (not through the cascade_jax package, whose __init__ imports the model).
    probe = ("import importlib.util, sys\n"
             "def load(name, path):\n"
             "    spec = importlib.util.spec_from_file_location(name, path)\n"
             "    module = sys.modules[name] = importlib.util.module_from_spec(spec)\n"
             "    spec.loader.exec_module(module)\n"
             "load('cascade_jax.rl.sandbox_programs', sys.argv[2])\nload('sandbox', sys.argv[1])\n"
             "print('jax' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe, sandbox.__file__, sandbox_programs.__file__],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
