"""Start and stop a `cascade-serve` judge (a checkpoint of ours behind an OpenAI-compatible endpoint) for the
judge rewards, as a context manager:

    with JudgeServer("runs/genrm", max_slots=16) as judge:
        rewards, counts = PairwiseJudge(JudgeConfig(base_url=judge.base_url, model=judge.model)).group_rewards(...)

The server runs in a child process, `cascade_jax.cli.serve.main(["--ckpt", CKPT, "--host", HOST, "--port", PORT,
...])` under `sys.executable`, in a session of its own (the terminal's Ctrl-C is the trainer's, which then closes
the server), with stdout and stderr in `log_path` (or a temporary file, kept; its path is `.log_path`), never on
the trainer's console. `start()` returns once `GET /v1/models` answers (the server compiles before it listens);
if the process exits first, or `startup_timeout_s` passes, it raises `JudgeServerError` (one line, with the last
lines of the log). `close()` (and leaving the `with`) sends SIGTERM to the server's process group, then SIGKILL
after `stop_timeout_s`.

The server does not outlive the trainer, even when the trainer is SIGKILLed:
  * a lifeline, as in `rewards/pool.py`: the child's stdin is a pipe whose only writer is the trainer; when it
    closes (close(), or the trainer dies) a thread in the child sends the child SIGTERM, and ends it with
    os._exit after `stop_timeout_s` if the graceful shutdown hangs. (A child forked without exec from the trainer,
    e.g. multiprocessing's "fork" start method, would hold the pipe open too; the project uses forkserver/spawn.)
  * on Linux also PR_SET_PDEATHSIG(SIGTERM), set by the child itself right after it starts (and followed by a
    check that its parent is still the trainer), when the server is started from the main thread: the kernel
    sends the signal when the *thread* that started the child ends, so from any other thread it would fire too
    early. It is not set through `preexec_fn`, which is unsafe in a multi-threaded process (the trainer runs
    JAX's threads, and JAX warns on every fork).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

import httpx

LOG_TAIL_LINES = 5
_LOG_TAIL_CHARS = 800

# Runs in the child: argv = [-c, parent pid, pdeathsig (0/1), stop timeout, serve module, *serve args].
_BOOTSTRAP = r"""# cascade_jax judge server (cascade_jax.rl.judge_server)
import os, signal, sys, threading, time
parent, pdeathsig, grace, module = int(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3]), sys.argv[4]
if pdeathsig and sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG
if os.getppid() != parent:   # the trainer died before the line above took effect
    os._exit(1)

def lifeline():
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)

threading.Thread(target=lifeline, name="judge-lifeline", daemon=True).start()
import importlib
sys.argv = ["cascade-serve", *sys.argv[5:]]
sys.exit(importlib.import_module(module).main(sys.argv[1:]))
"""


class JudgeServerError(RuntimeError):
    """The judge server did not come up (one line: why, and the last lines of its log)."""


class JudgeServer:
    """A `cascade-serve` process over `ckpt` (see the module doc). `max_slots`, `max_len`, `tokenizer`,
    `model_name` and `thinking` are passed on as cascade-serve's flags when given (None: its defaults, 16 slots
    and 2048 cache entries); `extra_args` are appended as they are; `env` adds environment variables for the
    server (e.g. CUDA_VISIBLE_DEVICES for the judge's own GPUs). `serve_module` is the module whose
    `main(argv)` serves (tests substitute a stub)."""

    def __init__(self, ckpt: str, *, port: int | None = None, host: str = "127.0.0.1", max_slots: int | None = None,
                 max_len: int | None = None, tokenizer: str | None = None, model_name: str | None = None,
                 thinking: bool | None = None, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_path: str | os.PathLike | None = None, startup_timeout_s: float = 600.0,
                 stop_timeout_s: float = 10.0, serve_module: str = "cascade_jax.cli.serve"):
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ValueError(f"JudgeServer: port: expected an int in [1, 65535] or None, got {port!r}")
        for name, value in (("max_slots", max_slots), ("max_len", max_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"JudgeServer: {name}: expected an int >= 1 or None, got {value!r}")
        if not startup_timeout_s > 0 or not stop_timeout_s > 0:
            raise ValueError("JudgeServer: startup_timeout_s and stop_timeout_s must be > 0")
        self.ckpt, self.host, self.port = str(ckpt), host, port
        self.startup_timeout_s, self.stop_timeout_s = float(startup_timeout_s), float(stop_timeout_s)
        self.serve_module, self.env = serve_module, dict(env or {})
        self.log_path = None if log_path is None else os.fspath(log_path)
        self._flags = list(extra_args)
        for flag, value in (("--max-slots", max_slots), ("--max-len", max_len), ("--tokenizer", tokenizer),
                            ("--model-name", model_name)):
            if value is not None:
                self._flags += [flag, str(value)]
        if thinking is not None:
            self._flags.append("--thinking" if thinking else "--no-thinking")
        self.process: subprocess.Popen | None = None
        self.model: str | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ".../v1" (valid once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> JudgeServer:
        if self.process is not None:
            raise JudgeServerError("JudgeServer: already started")
        if self.port is None:
            self.port = _free_port(self.host)
        elif not _port_is_free(self.host, self.port):
            raise JudgeServerError(f"JudgeServer: {self.host}:{self.port} is already in use")
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="cascade-judge-", suffix=".log")
            os.close(fd)
        main_thread = threading.current_thread() is threading.main_thread()
        command = [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), "1" if main_thread else "0",
                   str(self.stop_timeout_s), self.serve_module,
                   "--ckpt", self.ckpt, "--host", self.host, "--port", str(self.port), *self._flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        try:
            self.model = self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        url = self.base_url + "/models"
        with httpx.Client(timeout=5.0) as http:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise JudgeServerError(f"the judge server ({self.ckpt}) exited with code {code} before it "
                                           f"answered; {self._log_tail()}")
                try:
                    reply = http.get(url)
                    if reply.status_code == 200:
                        return str(reply.json()["data"][0]["id"])
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                    pass
                if time.monotonic() > deadline:
                    raise JudgeServerError(f"the judge server ({self.ckpt}) did not answer GET {url} within "
                                           f"{self.startup_timeout_s:g} s; {self._log_tail()}")
                time.sleep(0.25)

    def close(self) -> None:
        """Stops the server (SIGTERM to its process group, SIGKILL after `stop_timeout_s`) and reaps it."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.close()   # the lifeline: the child starts its own shutdown
        except OSError:
            pass
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
                lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError as e:
            return f"its log {self.log_path} cannot be read ({e})"
        tail = " | ".join(lines[-LOG_TAIL_LINES:]) or "(empty)"
        if len(tail) > _LOG_TAIL_CHARS:
            tail = "..." + tail[-_LOG_TAIL_CHARS:]
        return f"log {self.log_path}: {tail}"


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """`sig` to the child's process group (it leads one: start_new_session); the child is not reaped yet, so its
    pid cannot have been reused."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: TIME_WAIT does not count
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
