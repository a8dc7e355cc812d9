"""The `python` tool: run model-written code in a separate, contained process.

Every call is a fresh `python main.py` in a fresh, empty working directory (no interpreter state and no
files survive between calls: the model writes self-contained scripts, as with K2's code interpreter). I
chose this over a persistent kernel because a fresh process is what makes the limits below simple and
reliable, and it costs ~50 ms.

How it is contained on Linux (isolation "root" when we are root, "userns" for other users where
unprivileged user namespaces are allowed; both need the `unshare` binary from util-linux):
- new network namespace: only a loopback that is down, so no connection anywhere (not even the host's
  127.0.0.1);
- new mount namespace + pivot_root into a size-limited tmpfs that holds only read-only, nosuid bind mounts
  of /usr (and /bin, /lib... links), the Python installation, /etc/ld.so.cache and a few /dev nodes:
  the host's /etc, /root, /home, /work, /tmp... do not exist in there;
- new PID namespace: the script's process tree dies with it (fork bombs, daemons, `setsid` included);
- "root" only: the script runs as an unprivileged uid (fresh per call) with no supplementary groups,
  and PR_SET_NO_NEW_PRIVS; "userns": it is root of its own user namespace only;
- rlimits: CPU seconds, address space (memory), processes, file size, open files; no core dumps;
- the parent enforces a wall-clock timeout and an output cap, and kills the whole process group.
Elsewhere (isolation "none") only the rlimits, timeout and output cap apply; the result then says so, and
children that call setsid() can outlive the call.

Not contained, even with namespaces (tests/test_sandbox.py checks what is claimed above):
- it is not a VM: the kernel is shared, so a kernel exploit escapes, and /proc still shows kernel-wide
  facts (CPU model, uptime, load); the script can read /usr and the Python installation (read-only);
- limits are per process: up to max_procs processes may each use cpu_s seconds and memory_mb of memory
  until the wall-clock timeout (there is no cgroup);
- RLIMIT_NPROC does not hold a user namespace created *by root* ("userns" forced while root): there only
  the timeout and the PID namespace stop a fork bomb. The automatic choice for root is "root", where it holds.

Limit violations (timeout, CPU, memory, processes, output) raise ToolError with the output seen so far;
an ordinary exception in the script is a normal result (its traceback and exit code), not an error.

This file also runs as a script: `python sandbox.py CONFIG_JSON` is the bootstrap that sets the
namespace up from inside (it must stay stdlib-only at module level).
"""

from __future__ import annotations

import atexit
import json
import os
import random
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

WORKDIR = "/home/sandbox"  # the script's cwd inside the namespace
_LIVE: dict[int, str] = {}  # process group -> temp dir of the scripts running now (killed at interpreter exit)


@atexit.register
def _kill_live() -> None:
    """A Ctrl-C leaves tool threads running a script: their process groups (own sessions) would outlive us."""
    for pgid, tmp in list(_LIVE.items()):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock, enforced by the parent
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS per process
    max_procs: int = 64  # RLIMIT_NPROC (per uid)
    disk_mb: int = 64  # tmpfs size of the sandbox's root (and RLIMIT_FSIZE)
    output_bytes: int = 1 << 20  # stdout+stderr beyond this kills the script
    result_chars: int = 8000  # what the model sees: head and tail of the output


@dataclass
class RunResult:
    stdout: str
    stderr: str
    exit_code: int | None  # 128+N when killed by signal N
    violation: str | None  # which limit stopped it, or None
    isolation: str  # "root" | "userns" | "none"
    wall_s: float
    uid: int | None = None  # the unprivileged uid it ran as (isolation "root")


_ISOLATION: str | None = None
_PROBE_LOCK = threading.Lock()  # parallel tool calls must wait for the probe, never see a half-set answer


def isolation_mode() -> str:
    """The strongest isolation that works on this machine (probed once by running a real sandbox)."""
    global _ISOLATION
    with _PROBE_LOCK:
        if _ISOLATION is None:
            found = "none"
            if sys.platform.startswith("linux") and shutil.which("unshare"):
                for mode in (["root"] if os.geteuid() == 0 else []) + ["userns"]:
                    try:
                        r = run_code("print(6 * 7)", Limits(timeout_s=20), isolation=mode)
                    except OSError:
                        continue
                    if r.exit_code == 0 and r.stdout.strip() == "42":
                        found = mode
                        break
            _ISOLATION = found
    return _ISOLATION


def _unshare_cmd(mode: str) -> list[str]:
    cmd = ["unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    return cmd + (["--user", "--map-root-user"] if mode == "userns" else [])


def _bind_sources() -> list[str]:
    """What the script may read: the system's programs and libraries and this Python, nothing else."""
    paths = ["/usr", sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
             "/etc/ld.so.cache", "/etc/alternatives"]
    out: list[str] = []
    for p in paths:
        p = os.path.realpath(p)
        if os.path.exists(p) and not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def run_code(code: str, limits: Limits | None = None, isolation: str | None = None) -> RunResult:
    """Run `code` as a script under `limits`; never raises for what the script does."""
    limits = limits or Limits()
    mode = isolation or isolation_mode()
    tmp = tempfile.mkdtemp(prefix="moonlet-sbx-")
    try:
        with open(os.path.join(tmp, "main.py"), "w") as f:
            f.write(code)
        uid = random.randrange(100_000, 1_000_000) if os.geteuid() == 0 and mode == "root" else None
        cfg = {"mode": mode, "tmp": tmp, "uid": uid, "limits": asdict(limits), "python": sys.executable,
               "binds": _bind_sources() if mode != "none" else []}
        boot = [sys.executable, "-E", "-s", os.path.abspath(__file__), json.dumps(cfg)]
        cmd = boot if mode == "none" else _unshare_cmd(mode) + boot
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, env=env)
        _LIVE[proc.pid] = tmp
        try:
            out, err, violation = _collect(proc, limits)
        finally:
            _LIVE.pop(proc.pid, None)
        wall = time.monotonic() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    code_ = proc.returncode
    exit_code = 128 - code_ if code_ is not None and code_ < 0 else code_
    stderr = err.decode("utf-8", "replace")
    if violation is None:
        violation = _diagnose(exit_code, stderr, limits)
    return RunResult(out.decode("utf-8", "replace"), stderr, exit_code, violation, mode, wall, uid)


def _collect(proc: subprocess.Popen, limits: Limits) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr until exit, the wall-clock deadline or the output cap; kill the group after."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + limits.timeout_s
    violation = None
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now > deadline:
                violation = f"wall-clock timeout ({limits.timeout_s:g} s)"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # leftover children hold the pipes open; they are killed below
            for key, _ in sel.select(timeout=0.05):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
            if sum(map(len, bufs.values())) > limits.output_bytes:
                violation = f"output limit ({limits.output_bytes} bytes)"
                break
    finally:
        sel.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group; the PID namespace takes the rest
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    out, err = (bytes(b[: limits.output_bytes]) for b in bufs.values())
    return out, err, violation


def _diagnose(exit_code: int | None, stderr: str, limits: Limits) -> str | None:
    tail = stderr[-2000:]
    if exit_code == 128 + signal.SIGXCPU:
        return f"CPU time limit ({limits.cpu_s} s)"
    if exit_code and "MemoryError" in tail:
        return f"memory limit ({limits.memory_mb} MB address space)"
    if exit_code and ("BlockingIOError: [Errno 11]" in tail or "Resource temporarily unavailable" in tail):
        return f"process limit ({limits.max_procs} processes)"
    if exit_code == 128 + signal.SIGKILL:
        return "killed (SIGKILL): out of memory, or the code killed itself"
    return None


def clip(text: str, n: int) -> str:
    """Head and tail of `text` within about n characters, saying how much was cut."""
    if len(text) <= n:
        return text
    h = n * 2 // 3
    return f"{text[:h]}\n[... {len(text) - n} characters cut ...]\n{text[len(text) - (n - h):]}"


def format_result(r: RunResult, limits: Limits) -> str:
    text = r.stdout
    if r.stderr:
        text += ("\n" if text and not text.endswith("\n") else "") + "[stderr]\n" + r.stderr
    if r.exit_code:
        text += f"\n[exit code {r.exit_code}]"
    text = clip(text, limits.result_chars) if text else "[no output: print() what you want to see]"
    if r.isolation == "none":
        text = "[sandbox: no OS isolation here: network and files outside the working directory are " \
               "NOT blocked, only time/memory/output limits apply]\n" + text
    return text


def python_tool(limits: Limits | None = None, isolation: str | None = None, needs_approval: bool = False):
    """The `python` Tool: runs a script in the sandbox and returns its output."""
    from moonlet.agent.tools import Tool, ToolError

    limits = limits or Limits()

    def python(code: str) -> str:
        """Run a Python 3 script in a fresh sandboxed process and return what it prints (stdout, then
        stderr). No state or files persist between calls, there is no network, and time, memory and
        output are limited: print() the results you need.

        Args:
            code: the complete Python script to run.
        """
        r = run_code(code, limits, isolation)
        if r.violation:
            seen = clip((r.stdout + ("\n[stderr]\n" + r.stderr if r.stderr else "")).strip(), limits.result_chars)
            raise ToolError(f"python: the script was stopped by the sandbox: {r.violation}."
                            + (f" Output before that:\n{seen}" if seen else " It printed nothing before that."))
        return format_result(r, limits)

    return Tool.from_function(python, needs_approval=needs_approval)


# ---------------------------------------------------------------------------------------------------------
# bootstrap: runs as the first process inside the new namespaces (or plainly, for isolation "none")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)


def _setup_root(cfg: dict) -> None:
    """Build a tmpfs root of read-only bind mounts and pivot into it (mount namespace only)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = lambda s: s.encode() if s is not None else None
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {src} -> {dst}: {os.strerror(e)}")

    def bind(src: str, dst: str, writable: bool = False) -> None:
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        mount(src, dst, None, MS_BIND | MS_REC)
        # keep the flags the kernel locks (a user namespace may not drop nodev/noexec of the source)
        f = os.statvfs(dst).f_flag
        keep = f & (MS_NODEV | MS_NOEXEC) | (1024 if f & 1024 else 0) | (2048 if f & 2048 else 0)
        keep |= (1 << 21) if f & 4096 else 0  # ST_RELATIME -> MS_RELATIME
        mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_NOSUID | keep | (0 if writable else MS_RDONLY))

    lim, uid = cfg["limits"], cfg["uid"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = os.path.join(cfg["tmp"], "root")
    os.mkdir(root)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={lim['disk_mb']}m,mode=755")
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), os.path.join(root, name))
    for src in cfg["binds"]:
        bind(src, root + src)
    for dev in ("null", "zero", "random", "urandom"):
        bind("/dev/" + dev, f"{root}/dev/{dev}", writable=True)
    # exist_ok: the Python bound above may itself live under /tmp or /home (a virtualenv made by mktemp);
    # /dev/shm on the same size-limited tmpfs: POSIX semaphores (multiprocessing's locks and queues) live there
    for d in ("/tmp", "/dev/shm"):
        os.makedirs(root + d, mode=0o1777, exist_ok=True)
        os.chmod(root + d, 0o1777)
    os.makedirs(root + WORKDIR, exist_ok=True)
    if uid is not None:
        os.chown(root + WORKDIR, uid, uid)
    os.mkdir(root + "/proc")
    try:
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # /proc is a convenience (os.cpu_count, subprocess); scripts run without it
    os.chdir(root)
    if SYS_PIVOT_ROOT is not None and libc.syscall(SYS_PIVOT_ROOT, b".", b".") == 0:
        libc.umount2(b".", 2)  # MNT_DETACH: the old root is gone from this namespace
    else:
        os.chroot(".")
    os.chdir("/")


def _bootstrap(cfg: dict) -> int:
    lim, uid, mode = cfg["limits"], cfg["uid"], cfg["mode"]
    with open(os.path.join(cfg["tmp"], "main.py")) as f:
        code = f.read()
    if mode == "none":
        work = os.path.join(cfg["tmp"], "work")
        os.mkdir(work)
    else:
        _setup_root(cfg)
        work = WORKDIR
    with open(os.path.join(work, "main.py"), "w") as f:
        f.write(code)
    pid = os.fork()
    if pid == 0:
        try:
            mb = 1 << 20
            for res, val in ((resource.RLIMIT_CPU, lim["cpu_s"]), (resource.RLIMIT_AS, lim["memory_mb"] * mb),
                             (resource.RLIMIT_NPROC, lim["max_procs"]), (resource.RLIMIT_FSIZE, lim["disk_mb"] * mb),
                             (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
                # CPU: SIGXCPU at the soft limit (so we can say why), SIGKILL a second later at the hard one
                resource.setrlimit(res, (val, val + 1 if res == resource.RLIMIT_CPU else val))
            import ctypes

            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.chdir(work)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": "/tmp" if mode != "none" else work,
                   "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   # glibc reserves a 64 MB malloc arena per thread: under RLIMIT_AS a 15th thread failed to start
                   "MALLOC_ARENA_MAX": "2"}
            py = cfg["python"]
            os.execve(py, [py, "-E", "-s", "-u", "main.py"], env)
        except BaseException as e:  # report why the sandbox could not start
            os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        os._exit(127)
    while True:  # we may be PID 1: reap everything until our script is done, then leave (taking the rest)
        wpid, status = os.wait()
        if wpid == pid:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    try:
        sys.exit(_bootstrap(json.loads(sys.argv[1])))
    except OSError as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        sys.exit(125)
