"""Runs model-written Python in a throw-away, isolated process: the code-execution sandbox.

`run_python(program, timeout_s=..., memory_mb=..., cpu_s=...)` never raises for anything the
program does: every outcome is a `SandboxResult.status`. The status is the program's exit status, which
the program itself chooses: it is no evidence of anything the program claims (`hrjax.tasks.code_harness`
is how `code_pass` gets a verdict the program under test cannot forge). The program runs as
`python -I -S program.py` (isolated mode, no site-packages: the standard library only), three
processes down from the caller:

    caller -> bootstrap (unshares the namespaces) -> init (pid 1 of the new pid namespace: file
    system set-up, reaping) -> worker (drops to the sandbox uid, applies the limits, compiles the
    program, execs the interpreter)

Isolation; each named part is listed in `SandboxResult.isolation` when it took effect:

- 'net': a new network namespace with no interface up: no socket reaches anything, loopback too.
- 'pid': a new pid namespace whose pid 1 is our init: when the program ends, or the timeout kills
  the sandbox's process group, the kernel kills everything the program started. The caller's
  processes are invisible to it.
- 'mount': a private mount table. 'readonly': every mount in it read-only. /tmp, /var/tmp,
  /dev/shm and /run are fresh tmpfs of `disk_mb` each (the program's working dir is /tmp/work),
  and a new /proc shows the sandbox's processes only. If a directory above the interpreter's
  install is closed to others (pyenv under /root), an empty tmpfs covers that directory and the
  install is bind-mounted back at its own path.
- 'ipc': a new SysV IPC / POSIX message-queue namespace.
- 'uid' (root only): a fresh uid and gid for every run (in [2^30, 2^30 + 2^24), no account), no
  supplementary groups, no capabilities, no_new_privs: the program cannot write what it does not
  own, nor signal processes outside the sandbox. After the run every process of that uid is killed.
- 'audit', only where there is no network namespace: an audit hook refuses sockets, subprocesses,
  exec and ctypes. Best effort, not a security boundary (native code can get past it).

Always: rlimits (address space `memory_mb`, CPU `cpu_s`, `max_processes` tasks for the uid,
`disk_mb` per written file, 256 open files, no core dumps), stdin from /dev/null or from `stdin` (an
unnamed file), an environment of PATH, LANG, HOME and TMPDIR only (the caller's secrets never reach
it), its own session, killed whole on timeout. Without root (or CAP_SYS_ADMIN) only these and
'audit' remain, and the program runs as the caller's uid (whose other processes then count towards
`max_processes`). World-readable files stay readable in every mode. Linux only: >= 5.3 (pidfd),
>= 5.12 for 'readonly' (mount_setattr).
"""

from __future__ import annotations

# The sandbox's own processes run this file as a script (`python -I -S sandbox.py key=value ...`)
# and stop at the `__main__` guard below: they import only what they need (start-up is the
# sandbox's fixed cost per program) and never reach the caller-side imports after it.
import ctypes
import os
import resource
import signal
import stat
import sys

PROGRAM = "program.py"
SANDBOX_CWD = "/tmp/work"  # the program's working dir when 'mount' took effect
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}  # plus HOME and TMPDIR = cwd
_NAMESPACES = (("net", 0x40000000), ("pid", 0x20000000), ("mount", 0x00020000), ("ipc", 0x08000000))
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_AUDIT_PRELUDE = f"""\
import runpy, sys
DENIED = ("socket.__new__", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
          "ctypes.dlopen", "ctypes.dlsym")
def deny(event, args):
    if event in DENIED or (event == "import" and args[0] in ("_posixsubprocess", "_ctypes")):
        what = f"import {{args[0]}}" if event == "import" else event
        raise PermissionError(f"hrjax sandbox: {{what}} is refused (no network namespace here)")
sys.addaudithook(deny)
sys.argv = [{PROGRAM!r}]
runpy.run_path({PROGRAM!r}, run_name="__main__")
"""


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _bootstrap(spec: dict[str, str]) -> None:
    """The sandbox's first process: unshares what it may, then forks init and waits for it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the caller
    os.umask(0o022)
    isolation = [name for name, flag in _NAMESPACES if spec["namespaces"] == "1" and libc.unshare(flag) == 0]
    pid = os.fork()
    if pid == 0:
        _exit_after(_init, libc, spec, isolation)
    os.waitpid(pid, 0)


def _exit_after(body, *args) -> None:
    """Runs a forked child's body and exits: a child never returns into its parent's code."""
    try:
        body(*args)
    except BaseException as e:
        os.write(2, f"hrjax sandbox: {type(e).__name__}: {e}\n".encode(errors="replace"))
        os._exit(1)
    os._exit(0)


def _init(libc, spec: dict[str, str], isolation: list[str]) -> None:
    """Sets up the file system, runs the worker, reaps until it exits, reports its exit status."""
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    report = int(spec["report_fd"])
    if "mount" in isolation:
        with open(PROGRAM, "rb") as f:  # the caller's copy, about to be covered
            program = f.read()
        isolation += _private_filesystem(libc, spec, new_proc="pid" in isolation)
        os.mkdir(SANDBOX_CWD, 0o700)
        os.chdir(SANDBOX_CWD)
        with open(PROGRAM, "wb") as f:
            f.write(program)
    if spec["uid"]:
        os.chown(".", int(spec["uid"]), int(spec["uid"]))
        os.chmod(".", 0o700)
        isolation.append("uid")
    if "net" not in isolation:
        isolation.append("audit")
    os.write(report, f"isolation {' '.join(isolation)}\n".encode())
    failure_r, failure_w = os.pipe()  # close-on-exec: EOF once the worker has exec'd
    pid = os.fork()
    if pid == 0:
        os.close(failure_r)
        _worker(libc, spec, isolation, failure_w)
    os.close(failure_w)
    failure = os.read(failure_r, 64).decode()
    while (reaped := os.wait())[0] != pid:  # as pid 1, also reaps the program's orphans
        pass
    line = f"error {failure}" if failure else f"returncode {os.waitstatus_to_exitcode(reaped[1])}"
    os.write(report, f"{line}\n".encode())


def _worker(libc, spec: dict[str, str], isolation: list[str], failure_fd: int) -> None:
    """Becomes the program: limits, unprivileged uid, compile check, exec. Never returns."""

    def fail(stage: str, error: BaseException, hint: str = "") -> None:
        os.write(2, f"hrjax sandbox ({stage}): {type(error).__name__}: {error}{hint}\n".encode(errors="replace"))
        os.write(failure_fd, stage.encode())
        os._exit(1)

    python = spec["python"]
    try:
        for name, limits in spec.items():
            if name.startswith("RLIMIT_"):
                resource.setrlimit(getattr(resource, name), tuple(map(int, limits.split(":"))))
        if "uid" in isolation:
            os.setgroups([])
            os.setgid(int(spec["uid"]))
            os.setuid(int(spec["uid"]))
        # After the uid change, which clears it: the program dies with init even without 'pid'.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        with open(PROGRAM, "rb") as f:
            source = f.read()
    except BaseException as e:
        fail("setup", e)
    try:
        compile(source, PROGRAM, "exec")
    except BaseException as e:  # SyntaxError, ValueError, MemoryError, RecursionError
        fail("compile", e)
    os.close(int(spec["report_fd"]))
    cwd = os.getcwd()
    argv = [python, "-I", "-S", PROGRAM] if "net" in isolation else [python, "-I", "-S", "-c", _AUDIT_PRELUDE]
    try:
        os.execve(python, argv, dict(_ENV, HOME=cwd, TMPDIR=cwd))
    except OSError as e:
        fail("setup", e, "; the interpreter must be executable by other users, or the sandbox needs "
                         "a mount namespace (root) to expose it")


def _private_filesystem(libc, spec: dict[str, str], new_proc: bool) -> list[str]:
    """Read-only private mounts, fresh tmpfs scratch dirs, a new /proc; returns ['readonly'] if set."""
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _expose(libc, spec["prefix"])
    attr = _MountAttr(attr_set=_MS_RDONLY)  # MOUNT_ATTR_RDONLY == MS_RDONLY == 1
    readonly = libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), b"/",
                            ctypes.c_long(_AT_RECURSIVE), ctypes.byref(attr),
                            ctypes.c_long(ctypes.sizeof(attr))) == 0
    for path in _SCRATCH_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount(libc, "tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={spec['disk_mb']}m,mode=1777")
    if new_proc:
        _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    return ["readonly"] if readonly else []


def _expose(libc, prefix: str) -> None:
    """If a directory above `prefix` is closed to others, covers it and binds `prefix` back."""
    parts = prefix.strip("/").split("/")
    for closed in ("/" + "/".join(parts[:i]) for i in range(1, len(parts))):
        if not os.stat(closed).st_mode & stat.S_IXOTH:
            fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
            _mount(libc, "tmpfs", closed, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
            os.makedirs(prefix, 0o755)
            _mount(libc, f"/proc/self/fd/{fd}", prefix, None, _MS_BIND | _MS_REC)
            os.close(fd)
            return


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


if __name__ == "__main__":
    _bootstrap(dict(arg.split("=", 1) for arg in sys.argv[1:]))
    os._exit(0)  # skips interpreter teardown, and the caller-side code below

# The caller's side.
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

STATUSES = ("passed", "failed", "timeout", "error")
TAIL_CHARS = 4000  # characters of stdout / stderr kept, from the end
_UID_BASE, _UID_BITS = 1 << 30, 24


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """One program's outcome.

    status: 'passed' (exit 0), 'failed' (non-zero exit or killed by a signal), 'timeout' (wall
    clock or CPU limit), 'error' (did not compile, or the sandbox could not run it).
    returncode: the exit code, or minus the signal that killed it; None if it never exited itself.
    stdout, stderr: their last TAIL_CHARS characters (sandbox errors are in stderr).
    wall_s: seconds from start to end, the sandbox's own start-up included.
    isolation: the mechanisms that took effect (see the module docstring).
    uid: the uid the program ran as; None if it kept the caller's.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple[str, ...]
    uid: int | None


def run_python(program: str, *, timeout_s: float, memory_mb: int, cpu_s: float | None,
               max_processes: int = 64, disk_mb: int = 64, namespaces: bool = True,
               python: str | None = None, stdin: bytes = b"") -> SandboxResult:
    """Runs `program` in the sandbox; never raises for anything the program does.

    timeout_s: wall-clock seconds, start-up included; the whole process group is killed at it.
    memory_mb: address-space limit per process, MiB. cpu_s: CPU seconds per process, None = none.
    max_processes: processes and threads the program may have at once (root only: per-run uid).
    disk_mb: size limit of each written file and of each private tmpfs, MiB.
    namespaces: False skips the namespaces (as on hosts that refuse them), leaving the fallback.
    python: the interpreter that runs the program (default: this process's, symlinks resolved).
    stdin: what the program reads from its standard input (an unnamed file; empty: /dev/null).
    If the caller itself is SIGKILLed, the sandbox dies with it but its temp dir (the program and
    its output, in `tempfile.gettempdir()/hrjax-sandbox-*`) stays behind.
    """
    _check_limits(timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s, max_processes=max_processes,
                  disk_mb=disk_mb)
    uid = _UID_BASE + int.from_bytes(os.urandom(4), "little") % (1 << _UID_BITS) if os.geteuid() == 0 else None
    start = time.monotonic()
    outer = None
    try:
        outer = tempfile.mkdtemp(prefix="hrjax-sandbox-")
        python = os.path.realpath(python or sys.executable)
        limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": disk_mb << 20, "RLIMIT_NPROC": max_processes,
                  "RLIMIT_NOFILE": 256, "RLIMIT_CORE": 0}
        spec = {"python": python, "prefix": os.path.dirname(os.path.dirname(python)),
                "uid": "" if uid is None else str(uid), "namespaces": "1" if namespaces else "0",
                "disk_mb": str(disk_mb), **{k: f"{v}:{v}" for k, v in limits.items()}}
        if cpu_s is not None:  # SIGXCPU at the soft limit, SIGKILL a second later
            spec["RLIMIT_CPU"] = f"{math.ceil(cpu_s)}:{math.ceil(cpu_s) + 1}"
        return _run(program, stdin, outer, spec, timeout_s, start, uid)
    except OSError as e:
        return SandboxResult("error", None, "", f"hrjax sandbox could not run the program: {e}",
                             time.monotonic() - start, (), uid)
    finally:
        if uid is not None:
            kill_processes_of(uid)
        if outer is not None:
            shutil.rmtree(outer, ignore_errors=True)


def _check_limits(**limits) -> None:
    for name, value in limits.items():
        integral = name in ("memory_mb", "max_processes", "disk_mb")
        if value is None and name == "cpu_s":
            continue
        if (isinstance(value, bool) or not isinstance(value, int if integral else (int, float))
                or not 0 < value < math.inf):
            raise ValueError(f"run_python: {name} must be a positive finite {'integer' if integral else 'number'}, "
                             f"got {value!r}")
    if limits["memory_mb"] < 32:
        raise ValueError(f"run_python: memory_mb={limits['memory_mb']} is too small for a Python "
                         "interpreter; give at least 32")


def _run(program: str, stdin: bytes, outer: str, spec: dict[str, str], timeout_s: float, start: float,
         uid: int | None) -> SandboxResult:
    work = os.path.join(outer, "work")
    os.mkdir(work, 0o700)
    os.chmod(outer, 0o711)  # the sandbox uid may pass through to `work`, not list `outer`
    with open(os.path.join(work, PROGRAM), "wb") as f:
        f.write(program.encode("utf-8", "replace"))
    report_r, report_w = os.pipe()
    spec["report_fd"] = str(report_w)
    out, err = (os.open(os.path.join(outer, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                for name in ("stdout", "stderr"))
    try:
        try:  # stdin's file has no name (O_TMPFILE, or unlinked at once): only its descriptor reaches it
            with tempfile.TemporaryFile(dir=outer) if stdin else contextlib.nullcontext() as source:
                if source is not None:
                    source.write(stdin)
                    source.seek(0)
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", os.path.abspath(__file__), *(f"{k}={v}" for k, v in spec.items())],
                    cwd=work, env={}, stdin=subprocess.DEVNULL if source is None else source, stdout=out,
                    stderr=err, pass_fds=(report_w,), start_new_session=True)
        finally:
            os.close(report_w)
        timed_out = _wait(proc, timeout_s)
        wall_s = time.monotonic() - start
        report = _read_report(report_r)
        return SandboxResult(status=_status(timed_out, report), returncode=report.get("returncode"),
                             stdout=_tail(out), stderr=_tail(err), wall_s=wall_s,
                             isolation=tuple(report.get("isolation", ())), uid=uid)
    finally:
        for fd in (report_r, out, err):
            os.close(fd)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Waits for the bootstrap; True if the timeout struck. Its whole process group is killed
    either way (the group id stays taken while any member lives, so it names no one else).
    Waits on a pidfd (Linux >= 5.3): `Popen.wait(timeout)` polls, with up to 2x latency."""
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            return not poll.poll(math.ceil(timeout_s * 1000))
        finally:
            os.close(pidfd)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _read_report(fd: int) -> dict:
    """The init's report lines: 'isolation <names>', then 'returncode <n>' or 'error <stage>'."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            data += chunk
    report: dict = {}
    for line in data.decode().splitlines():
        key, _, value = line.partition(" ")
        report[key] = value.split() if key == "isolation" else int(value) if key == "returncode" else value
    return report


def _status(timed_out: bool, report: dict) -> str:
    if timed_out:
        return "timeout"
    if "returncode" not in report:
        return "error"
    if report["returncode"] == 0:
        return "passed"
    return "timeout" if report["returncode"] == -signal.SIGXCPU else "failed"


def _tail(fd: int) -> str:
    size = os.lseek(fd, 0, os.SEEK_END)
    data = os.pread(fd, 4 * TAIL_CHARS, max(0, size - 4 * TAIL_CHARS))
    return data.decode("utf-8", "replace")[-TAIL_CHARS:]


def processes_of(uid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose real uid is `uid`, from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(name))
    return pids


def kill_processes_of(uid: int, patience_s: float = 5.0) -> None:
    """SIGKILLs every process of `uid` until none is left (or `patience_s` seconds have passed)."""
    deadline = time.monotonic() + patience_s
    while (pids := processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
