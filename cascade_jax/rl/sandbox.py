"""Code-execution sandbox for RL code rewards: untrusted Python under resource limits and isolation.

``run_python(code)`` runs one program; ``run_tests(code, tests)`` runs a solution and then each ``assert ...``
test in one sandboxed program and counts the passes; ``code_reward`` turns that into a strict binary reward.
Standard library only (no jax); the programs it runs inside the sandbox are in ``sandbox_programs.py``.

Isolation (``SandboxResult.isolation``; ``isolation="auto"`` takes bwrap when ``bwrap`` is installed and a
cached probe shows it works, else the fallback):

``"bwrap"`` (bubblewrap; ``scripts/setup.sh`` installs it):
    new user, PID, network (no interfaces but an unconnected loopback), IPC, UTS and cgroup namespaces;
    an empty root (tmpfs, read-only after set-up) holding only read-only binds of /usr (and /bin, /lib, ...
    or their merged-/usr symlinks), a few /etc files (ld.so cache, passwd, group, localtime, ...) and the
    interpreter's prefix directories (real paths: sys.prefix, sys.base_prefix, ... e.g. the venv and pyenv),
    a fresh /proc and /dev, and two size-capped private tmpfs: /tmp and the working directory /sandbox/work
    (cwd and HOME; the program's files are read-only binds in it). Nothing else of the host is visible and
    nothing of it is writable; the program cannot reach the host's network or signal the host's processes.
    ``--clearenv`` with PATH, HOME, LANG and PYTHONDONTWRITEBYTECODE only; ``--new-session``,
    ``--die-with-parent``. The program runs as uid/gid 65534 with no capabilities and no_new_privs, and can
    create no further user namespaces. As root, bwrap's own user namespace would map the sandbox uid to host
    uid 0, which RLIMIT_NPROC exempts: so as root this module creates the user namespace itself (uid and
    gid 65534 -> host 65534, 0 -> 0 for bwrap's set-up, max_user_namespaces 0 inside) and passes it with
    ``--userns``; a bootstrap inside drops from 0 to 65534 before the program starts. When the program
    exits, bwrap's init (PID 1 of the namespace) exits and the kernel kills everything left in it.

``"rlimits"`` (fallback; WEAKER):
    the same resource limits and environment, the program in its own session, run under a supervisor that
    is a child subreaper and kills every descendant when the program exits or the wall time runs out. No
    namespaces: the program sees the host's filesystem (only Unix permissions protect it), /tmp is the
    host's, the disk use of its directory is capped only per file, and the NETWORK IS NOT BLOCKED. As root
    the program runs as a random unprivileged uid (its own RLIMIT_NPROC budget; it cannot write root's files
    or signal root's processes, e.g. the host); when that uid cannot read the interpreter (e.g. pyenv under
    a 0700 /root) it keeps CAP_DAC_READ_SEARCH as an ambient capability, so it can then READ every file of
    the host. Not as root, it runs as the calling user and can signal and write what that user can.

Limits in both modes: RLIMIT_CPU (SIGXCPU), RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE and RLIMIT_CORE 0 on the
program and each of its processes, a wall-clock timeout that kills the whole attempt, and a cap on the
captured stdout+stderr (the attempt is killed once it is exceeded). When a call returns, no process of the
attempt is alive. Memory is bounded per process (RLIMIT_AS), not in total: up to ``max_processes`` times
``memory_bytes`` (there is no memory cgroup).

``run_python`` may be called from several threads at once (no preexec_fn; each call has its own pipes and
directories); callers bound the parallelism themselves (e.g. a process pool).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace

from cascade_jax.rl.sandbox_programs import BOOT, RUNNER

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "run_tests", "code_reward"]

SANDBOX_UID = 65534                       # nobody: the program's uid in bwrap mode
WORK_DIR = "/sandbox/work"                # cwd and HOME inside bwrap
_FALLBACK_UIDS = (1 << 30, 1 << 24)       # as root the fallback runs as a random uid in [base, base + span)
_RESULT_CAP = 1 << 16                     # bytes kept from run_tests' result channel
_GRACE_S = 1.0                            # after the program exits: time for stray writers to go away
_REAP_S = 5.0                             # waiting for a killed attempt to be gone
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
              "/etc/group", "/etc/nsswitch.conf", "/etc/alternatives")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-attempt limits. Times in seconds (CPU time is rounded up to whole seconds), sizes in bytes."""

    cpu_seconds: float = 10
    wall_seconds: float = 10
    memory_bytes: int = 1 << 30           # address space (RLIMIT_AS) of each process
    max_processes: int = 64               # processes and threads (RLIMIT_NPROC)
    max_file_bytes: int = 16 << 20        # largest file it may write (RLIMIT_FSIZE); tmpfs are 4x this
    max_output_bytes: int = 1 << 20       # stdout+stderr captured; beyond it the attempt is killed

    def __post_init__(self):
        for name in ("cpu_seconds", "wall_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"SandboxLimits.{name} must be a finite number > 0, got {value!r}")
        for name, low in (("memory_bytes", 1 << 24), ("max_processes", 1), ("max_file_bytes", 1),
                          ("max_output_bytes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SandboxLimits.{name} must be an int >= {low}, got {value!r}")


@dataclass
class SandboxResult:
    returncode: int | None        # the program's exit status (128 + N: killed by signal N); None: we killed it
    stdout: str
    stderr: str
    timed_out: bool               # killed at the wall-clock limit
    output_truncated: bool        # stdout+stderr exceeded max_output_bytes (the attempt was killed)
    isolation: str                # "bwrap" or "rlimits"
    wall_seconds: float


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits(), python: str | None = None,
               isolation: str = "auto") -> SandboxResult:
    """Runs ``code`` as ``main.py`` (``python -I -S``, default ``sys.executable``) in a fresh directory inside
    the sandbox; ``stdin`` is its standard input. See the module docstring for what each isolation gives."""
    interp = _interpreter(python)
    mode = _resolve_isolation(isolation, interp)
    result, _ = _execute({"main.py": code}, stdin.encode("utf-8"), limits, interp, mode, result_channel=False)
    return result


def run_tests(code: str, tests: list[str], timeout_s: float | None = None, *,
              limits: SandboxLimits = SandboxLimits(), isolation: str = "auto",
              python: str | None = None) -> tuple[int, int]:
    """Runs ``code`` and then each test (``assert ...`` source) in one sandboxed program; (passed, total).

    Drop-in for ``cascade_jax.data.tasks.python_functions.run_tests``: ``timeout_s``, when given, sets the wall
    time (and caps the CPU time). The solution runs as ``__main__`` from ``solution.py``; an exception from it
    (syntax error included), a crash, a timeout, truncated output or a missing report all give 0 passed.

    Counting: a runner executes the solution with ``exec`` in its own namespace, then each test in that
    namespace, and reports "<nonce> <passed> <total>" on a pipe of its own. The host makes the nonce per call
    and sends it with the tests on stdin (then /dev/null), so neither is in the program's files. Limits: the
    solution runs in the runner's process, so code written to cheat can still find the nonce (the runner's
    frame) and the pipe, and objects that compare equal to anything pass ``==`` tests; it is a bar against
    accidents and casual forgery, not against code written to attack this runner.
    """
    passed, total, _ = _run_tests(code, tests, timeout_s, limits, isolation, python)
    return passed, total


def code_reward(response_code: str, tests: list[str], *, limits: SandboxLimits = SandboxLimits(),
                isolation: str = "auto", python: str | None = None) -> tuple[float, dict]:
    """1.0 when there are tests and all of them pass, else 0.0; details: passed, total, timed_out, isolation,
    truncated, returncode."""
    passed, total, result = _run_tests(response_code, tests, None, limits, isolation, python)
    details = {"passed": passed, "total": total, "timed_out": bool(result and result.timed_out),
               "isolation": result.isolation if result else None,
               "truncated": bool(result and result.output_truncated),
               "returncode": result.returncode if result else None}
    return (1.0 if total > 0 and passed == total else 0.0), details


# ------------------------------------------------------------------------------------------------ run_tests

def _run_tests(code, tests, timeout_s, limits, isolation, python):
    tests = [str(t) for t in tests]
    if not tests:
        return 0, 0, None
    if timeout_s is not None:
        limits = replace(limits, wall_seconds=float(timeout_s), cpu_seconds=min(limits.cpu_seconds, timeout_s))
    interp = _interpreter(python)
    mode = _resolve_isolation(isolation, interp)
    nonce = secrets.token_hex(16)
    payload = {"nonce": nonce, "tests": tests}   # "fd" is filled in by _execute
    result, report = _execute({"main.py": RUNNER, "solution.py": code}, payload, limits, interp, mode,
                              result_channel=True)
    passed = None
    if result.returncode == 0 and not result.timed_out and not result.output_truncated:
        for line in report.decode("ascii", errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit() and parts[2] == str(len(tests)):
                count = min(int(parts[1]), len(tests))
                passed = count if passed is None else min(passed, count)
    return passed or 0, len(tests), result


# --------------------------------------------------------------------------------------------- interpreter

@dataclass(frozen=True)
class _Interpreter:
    path: str                     # what is exec'd (the same path inside bwrap)
    dirs: tuple[str, ...]         # real directories it needs, bound read-only at the same paths


_LOCK = threading.Lock()
_INTERPRETERS: dict[str, _Interpreter] = {}
_PROBES: dict[tuple, str] = {}


def _interpreter(python: str | None) -> _Interpreter:
    exe = python or sys.executable
    if os.sep not in exe:
        found = shutil.which(exe)
        if found is None:
            raise ValueError(f"python interpreter {exe!r} not found on PATH")
        exe = found
    exe = key = os.path.abspath(exe)
    with _LOCK:
        if key in _INTERPRETERS:
            return _INTERPRETERS[key]
    if exe == os.path.abspath(sys.executable):
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        # the interpreter itself (a wrapper such as a pyenv shim is not run inside), and its prefixes
        probe = subprocess.run([exe, "-I", "-S", "-c", "import sys; print(sys.executable, sys.prefix, "
                                "sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, sep='\\n')"],
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        lines = probe.stdout.split("\n")
        if probe.returncode != 0 or len(lines) < 5 or not os.path.isabs(lines[0]):
            raise ValueError(f"python interpreter {exe!r} does not run: {probe.stderr.strip()[-200:]!r}")
        exe, prefixes = lines[0], lines[1:5]
    # exec the given path when only its last component may be a link (a venv's bin/python), else the real one
    path = exe if os.path.realpath(os.path.dirname(exe)) == os.path.dirname(exe) else os.path.realpath(exe)
    dirs = {os.path.realpath(p) for p in prefixes if p} | {os.path.dirname(path), os.path.dirname(os.path.realpath(exe))}
    interp = _Interpreter(path, tuple(sorted(dirs)))
    with _LOCK:
        _INTERPRETERS[key] = interp
    return interp


def _resolve_isolation(isolation: str, interp: _Interpreter) -> str:
    if isolation not in ("auto", "bwrap", "rlimits"):
        raise ValueError(f"isolation must be 'auto', 'bwrap' or 'rlimits', got {isolation!r}")
    if isolation == "rlimits":
        return "rlimits"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if isolation == "bwrap":
            raise RuntimeError("isolation='bwrap' but bubblewrap (bwrap) is not installed: run scripts/setup.sh")
        return "rlimits"
    error = _probe_bwrap(bwrap, interp)
    if error and isolation == "bwrap":
        raise RuntimeError(f"isolation='bwrap' but bwrap does not work here: {error}")
    return "rlimits" if error else "bwrap"


def _probe_bwrap(bwrap: str, interp: _Interpreter) -> str:
    """'' when a trivial program runs under bwrap with the flags used here, else why not (cached)."""
    key = (bwrap, interp, os.geteuid())
    with _LOCK:
        if key in _PROBES:
            return _PROBES[key]
        try:
            limits = SandboxLimits(cpu_seconds=10, wall_seconds=30, max_processes=16)
            result, _ = _execute({"main.py": "print('ok')"}, b"", limits, interp, "bwrap", result_channel=False)
            ok = result.returncode == 0 and result.stdout == "ok\n"
            error = "" if ok else f"probe exited {result.returncode}: {result.stderr.strip()[-300:]!r}"
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            error = f"{type(e).__name__}: {e}"
        _PROBES[key] = error.replace("\n", " ")
        return _PROBES[key]


# ----------------------------------------------------------------------------------------------- limits

def _rlimits(limits: SandboxLimits) -> list:
    cpu = max(1, math.ceil(limits.cpu_seconds))
    return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
            ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
            ("RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes), ("RLIMIT_CORE", 0, 0)]


# ---------------------------------------------------------------------------------------------------- bwrap

_USERNS_HELPER = r'''
import os, sys
os.unshare(os.CLONE_NEWUSER)
sys.stdout.write("u"); sys.stdout.flush()
sys.stdin.readline()
try:
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    sys.stdout.write("k")
except OSError:
    sys.stdout.write("n")
sys.stdout.flush()
sys.stdin.read()
'''


def _make_userns() -> int:
    """As root: a user namespace mapping 0 -> 0 and 65534 -> 65534 (uids and gids) in which no further user
    namespace can be made; returns an fd of it (the caller closes it)."""
    helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _USERNS_HELPER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if helper.stdout.read(1) != b"u":
            raise RuntimeError(f"cannot create a user namespace: {helper.stderr.read().decode()[-300:]!r}")
        mapping = f"0 0 1\n{SANDBOX_UID} {SANDBOX_UID} 1\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(mapping)
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        helper.stdin.write(b"\n")
        helper.stdin.flush()
        helper.stdout.read(1)          # "k": no nested user namespaces; "n": could not set that (still usable)
        return fd
    finally:
        helper.stdin.close()
        helper.kill()
        helper.wait()
        helper.stdout.close()
        helper.stderr.close()


def _bwrap_args(bwrap: str, interp: _Interpreter, files: list[str], limits: SandboxLimits, userns_fd: int | None,
                info_fd: int, block_fd: int) -> list[str]:
    args = [bwrap]
    if userns_fd is not None:      # root: our own user namespace; bwrap sets up as 0, the bootstrap drops to 65534
        args += ["--userns", str(userns_fd), "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--hostname", "sandbox",
             "--info-fd", str(info_fd), "--block-fd", str(block_fd)]
    system = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
            system.append(d)

    def inside(path, roots):
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    binds = []
    for d in sorted(interp.dirs, key=len):
        if d != "/" and os.path.isdir(d) and not inside(d, system + binds):
            binds.append(d)
    parents = set()
    for d in binds + [WORK_DIR, "/etc"]:
        parent = os.path.dirname(d)
        while parent != "/" and not inside(parent, system):
            parents.add(parent)
            parent = os.path.dirname(parent)
    # The private /tmp comes before the binds: a tmpfs mounted later would hide an interpreter under /tmp.
    tmpfs_size = str(max(4 * limits.max_file_bytes, 1 << 20))
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", tmpfs_size, "--tmpfs", "/tmp"]
    for d in sorted(parents | {"/etc"}, key=lambda p: (p.count("/"), p)):
        args += ["--perms", "0755", "--dir", d]
    for f in _ETC_FILES:
        args += ["--ro-bind-try", f, f]
    for d in binds:
        args += ["--ro-bind", d, d]
    args += ["--perms", "1777", "--size", tmpfs_size, "--tmpfs", WORK_DIR]
    for host_path in files:
        args += ["--ro-bind", host_path, f"{WORK_DIR}/{os.path.basename(host_path)}"]
    args += ["--remount-ro", "/", "--chdir", WORK_DIR, "--clearenv"]
    for key, value in {**_ENV, "HOME": WORK_DIR}.items():
        args += ["--setenv", key, value]
    return args


# -------------------------------------------------------------------------------------------------- execute

def _execute(files: dict[str, str], stdin, limits: SandboxLimits, interp: _Interpreter, mode: str,
             result_channel: bool) -> tuple[SandboxResult, bytes]:
    """Runs main.py of ``files`` in ``mode``; ``stdin`` is bytes, or (result_channel) the run_tests payload to
    which the result pipe's fd number is added. Returns the result and what came on the result pipe."""
    root = os.geteuid() == 0
    workdir = tempfile.mkdtemp(prefix="cascade_sandbox_")
    opened: list[int] = []            # host fds to close at the end
    proc = None
    try:
        paths = []
        for name, text in files.items():
            path = os.path.join(workdir, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(path, 0o644)
            paths.append(path)
        result_r = result_w = None
        if result_channel:
            result_r, result_w = os.pipe()
            opened += [result_r, result_w]
            stdin = json.dumps({**stdin, "fd": result_w}).encode("utf-8")
        stdin_file = tempfile.TemporaryFile()
        stdin_file.write(stdin)
        stdin_file.seek(0)
        keep_fds = [result_w] if result_w is not None else []
        pass_fds = list(keep_fds)
        info_r = block_w = userns_fd = None
        if mode == "bwrap":
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            opened += [info_r, info_w, block_r, block_w]
            if root:
                userns_fd = _make_userns()
                opened.append(userns_fd)
            pass_fds += [info_w, block_r] + ([userns_fd] if userns_fd is not None else [])
            main = f"{WORK_DIR}/main.py"
            uid = SANDBOX_UID if root else None
            argv = _bwrap_args(shutil.which("bwrap") or "bwrap", interp, paths, limits, userns_fd, info_w, block_r)
            argv.append("--")
            cwd, env = workdir, None
        else:
            main = os.path.join(workdir, "main.py")
            uid = None
            if root:
                uid = _FALLBACK_UIDS[0] + secrets.randbelow(_FALLBACK_UIDS[1])
                os.chown(workdir, uid, uid)
                os.chmod(workdir, 0o700)
            argv, cwd, env = [], workdir, {**_ENV, "HOME": workdir, "TMPDIR": workdir}
        cfg = {"mode": mode, "uid": uid, "rlimits": _rlimits(limits), "keep_fds": keep_fds,
               "supervise": mode != "bwrap"}
        argv += [interp.path, "-I", "-S", "-c", BOOT, json.dumps(cfg), interp.path, "-I", "-S", main]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                    env=env, pass_fds=pass_fds, start_new_session=True)
        finally:
            stdin_file.close()
            for fd in pass_fds:           # the child has them now
                _close(fd, opened)
        result, report = _supervise(proc, mode, limits, start, result_r, info_r, block_w, opened)
        proc = None
        return result, report
    finally:
        if proc is not None:              # an error on our side: leave nothing running
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()
        for fd in list(opened):
            _close(fd, opened)
        _rmtree(workdir)


def _supervise(proc, mode, limits, start, result_r, info_r, block_w, opened):
    deadline = start + limits.wall_seconds
    sel = selectors.DefaultSelector()
    captured = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    report = bytearray()
    for fd in list(captured) + [fd for fd in (result_r, info_r) if fd is not None]:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    info = bytearray()
    try:
        proc_fd = os.pidfd_open(proc.pid)
        opened.append(proc_fd)
        sel.register(proc_fd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        proc_fd = None
    init_fd = None                    # bwrap: pidfd of the namespace's init (PID 1)
    total, truncated, timed_out, exited_at = 0, False, False, None
    try:
        while True:
            if exited_at is None and _exited(proc.pid):
                exited_at = time.monotonic()
            now = time.monotonic()
            streams_open = any(key.fd in captured or key.fd == result_r for key in sel.get_map().values())
            if exited_at is not None and (not streams_open or now > exited_at + _GRACE_S):
                break
            if exited_at is None and now >= deadline:
                timed_out = True
                break
            wait = (exited_at + _GRACE_S if exited_at is not None else deadline) - now
            for key, _ in sel.select(timeout=min(max(wait, 0.0), 0.25 if proc_fd is None else wait)):
                fd = key.fd
                if fd == proc_fd:
                    sel.unregister(fd)
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    if fd == info_r:
                        init_fd = _start_bwrap_child(info, block_w, opened)
                    continue
                if fd == info_r:
                    info += chunk
                elif fd == result_r:
                    report += chunk[:max(0, _RESULT_CAP - len(report))]
                else:
                    room = limits.max_output_bytes - total
                    captured[fd] += chunk[:room]
                    total += min(len(chunk), room)
                    if len(chunk) > room:
                        truncated = True
            if truncated:
                break
    finally:
        sel.close()
        if block_w in opened:         # bwrap ended before reporting its child: let nothing wait on us
            _close(block_w, opened)
        returncode = _finish(proc, mode, init_fd, killed=exited_at is None)
    elapsed = time.monotonic() - start
    out, err = captured[proc.stdout.fileno()], captured[proc.stderr.fileno()]
    proc.stdout.close()
    proc.stderr.close()
    result = SandboxResult(returncode=None if timed_out or truncated or returncode is None else returncode,
                           stdout=out.decode("utf-8", errors="replace"), stderr=err.decode("utf-8", errors="replace"),
                           timed_out=timed_out, output_truncated=truncated, isolation=mode, wall_seconds=elapsed)
    return result, bytes(report)


def _start_bwrap_child(info: bytearray, block_w: int, opened: list[int]) -> int | None:
    """bwrap reported its child (the namespace's init, blocked on --block-fd): pin it with a pidfd, release it."""
    init_fd = None
    try:
        pid = int(json.loads(bytes(info).decode())["child-pid"])
        init_fd = os.pidfd_open(pid)
        opened.append(init_fd)
    except (ValueError, KeyError, TypeError, OSError, AttributeError):
        init_fd = None
    try:
        os.write(block_w, b"g")
    except OSError:
        pass
    _close(block_w, opened)
    return init_fd


def _finish(proc, mode: str, init_fd: int | None, killed: bool) -> int | None:
    """Kills what is left of the attempt, waits until it is gone, reaps; the program's exit status (None: killed)."""
    if killed:
        if mode == "bwrap":
            _pidfd_kill(init_fd)
        else:                         # the supervisor kills its descendants on SIGTERM
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except OSError:
                pass
            _wait_exit(proc.pid, _REAP_S)
    _kill_group(proc.pid)             # before reaping, so the group id cannot have been reused
    if mode == "bwrap":
        _pidfd_kill(init_fd)
        if init_fd is not None:
            _wait_fd(init_fd, _REAP_S)
    try:
        status = proc.wait(timeout=_REAP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    if killed:
        return None
    return status if status >= 0 else 128 - status


def _exited(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _wait_exit(pid: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not _exited(pid) and time.monotonic() < end:
        time.sleep(0.01)


def _wait_fd(fd: int, timeout: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        sel.select(timeout=timeout)


def _pidfd_kill(fd: int | None) -> None:
    if fd is not None:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _close(fd: int, opened: list[int]) -> None:
    if fd in opened:
        opened.remove(fd)
        try:
            os.close(fd)
        except OSError:
            pass


def _rmtree(path: str) -> None:
    def make_writable(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass
    try:
        shutil.rmtree(path, onexc=make_writable)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
