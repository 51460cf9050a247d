"""The programs that run inside the sandbox (as source text: they execute in the sandboxed interpreter, not here).

``RUNNER`` is run_tests' main program: it executes the solution, then each test, and reports the passes on a
pipe with a nonce the code under test never sees in its files. ``BOOT`` starts every attempt: in bwrap mode it
drops to the sandbox uid (as root), sets the resource limits and execs the program; in the fallback it first
becomes a supervisor (child subreaper) whose child does that, and it kills every descendant at the end.
"""

RUNNER = r'''
def _cascade_sandbox_runner():
    import json, os, sys, traceback
    _write, _exit, _compile, _exec, _len, _str = os.write, os._exit, compile, exec, len, str
    cfg = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    nonce, fd, tests = cfg["nonce"], cfg["fd"], cfg["tests"]
    del cfg
    os.set_inheritable(fd, False)
    path = os.path.join(os.getcwd(), "solution.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    passed, ok = 0, True
    try:
        _exec(_compile(source, path, "exec"), namespace)
    except BaseException:
        ok = False
        try:
            traceback.print_exc()
        except BaseException:
            pass
    if ok:
        for test in tests:
            try:
                _exec(_compile(test, "<test>", "exec"), namespace)
                passed += 1
            except BaseException:
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    _write(fd, (nonce + " " + _str(passed) + " " + _str(_len(tests)) + "\n").encode())
    _exit(0)


_cascade_sandbox_runner()
'''


# Runs in the sandbox interpreter: ``python -I -S -c BOOT <config json> <program argv...>``. In bwrap mode it is
# the sandbox's command: drop to the sandbox uid (as root), set the limits, exec the program. In the fallback it
# first becomes a supervisor (child subreaper) whose child does that, and kills every descendant at the end.
BOOT = r'''
import json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
argv = sys.argv[2:]


def libc():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except Exception:
        return None


def capset(lib, bits):
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = bits
    if lib.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    if cfg["mode"] == "bwrap":
        os.setresuid(uid, uid, uid)
        return
    lib = libc()
    if lib is not None:
        lib.prctl(8, 1, 0, 0, 0)                                   # PR_SET_KEEPCAPS
    os.setresuid(uid, uid, 0)                                      # real uid = uid: os.access answers for it
    lib_dir = os.path.dirname(os.__file__)
    readable = (os.access(os.path.realpath(argv[0]), os.X_OK) and os.access(os.__file__, os.R_OK)
                and os.access(os.path.dirname(resource.__file__), os.R_OK | os.X_OK)
                and os.access(lib_dir, os.R_OK | os.X_OK) and os.access(argv[-1], os.R_OK))
    os.setresuid(uid, uid, uid)
    if lib is None:
        if not readable:
            raise OSError("the interpreter is not readable by the sandbox uid and ctypes is unavailable")
        return
    bit = 1 << 2                                                   # CAP_DAC_READ_SEARCH
    capset(lib, 0 if readable else bit)
    if not readable and lib.prctl(47, 2, 2, 0, 0) != 0:           # PR_CAP_AMBIENT, RAISE, CAP_DAC_READ_SEARCH
        raise OSError(ctypes_errno(), "PR_CAP_AMBIENT_RAISE")


def ctypes_errno():
    import ctypes
    return ctypes.get_errno()


def start_program():
    try:
        keep = {0, 1, 2} | set(cfg["keep_fds"])
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        if cfg["uid"] is not None:
            drop_privileges(cfg["uid"])
        if cfg["mode"] != "bwrap":
            lib = libc()
            if lib is not None:
                lib.prctl(38, 1, 0, 0, 0)                          # PR_SET_NO_NEW_PRIVS (bwrap sets it itself)
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.execv(argv[0], argv)
    except BaseException as e:
        try:
            os.write(2, ("sandbox: cannot start the program: %s\n" % (e,)).encode())
        finally:
            os._exit(126)


def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            children.setdefault(int(data[data.rindex(b")") + 2:].split()[1]), []).append(int(name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def supervise():
    lib = libc()
    if lib is not None:
        lib.prctl(36, 1, 0, 0, 0)                                  # PR_SET_CHILD_SUBREAPER
    waited = {signal.SIGCHLD, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        start_program()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for fd in cfg["keep_fds"]:
        try:
            os.close(fd)
        except OSError:
            pass
    status = None
    while status is None:
        if signal.sigwait(waited) == signal.SIGTERM:
            break
        while True:
            try:
                done, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if done == 0:
                break
            if done == pid:
                status = st
    for _ in range(10000):
        reap()
        found = descendants()
        if not found:
            break
        for child in found:
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
    if status is None:
        os._exit(128 + signal.SIGKILL)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


if cfg["supervise"]:
    supervise()
else:
    start_program()
'''
