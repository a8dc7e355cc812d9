"""The python tool's sandbox against real attacks, in every isolation mode this machine supports.

Isolation modes: "root" (we are root: namespaces + pivot_root + an unprivileged uid), "userns" (an
unprivileged user namespace, what non-root users get) and "none" (rlimits and timeouts only, with a warning
in the result). Limit violations are ToolErrors; what a script does inside its box is a normal result.
"""

import os
import socket
import threading
import time
import uuid

import pytest

from moonlet.agent.sandbox import Limits, isolation_mode, run_code
from moonlet.agent.sandbox import python_tool as make_python_tool
from moonlet.agent.tools import ToolError

FAST = Limits(timeout_s=3, cpu_s=3, memory_mb=512, max_procs=32, result_chars=2000)


def _works(mode: str) -> bool:
    try:
        r = run_code("print('ok')", Limits(timeout_s=20), isolation=mode)
    except OSError:
        return False
    return r.stdout.strip() == "ok"


ISOLATED = [m for m in ("root", "userns") if (m != "root" or os.geteuid() == 0) and _works(m)]
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="no namespace isolation on this machine")
isolated = pytest.mark.parametrize("mode", ISOLATED or ["root"])


def tool(mode=None, limits=FAST):
    return make_python_tool(limits, isolation=mode)


def _pids_with(marker: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def test_root_gets_the_strongest_isolation_that_works():
    if not ISOLATED:
        pytest.skip("no namespaces here: the sandbox runs in 'none' mode (its results say so)")
    assert isolation_mode() == ("root" if os.geteuid() == 0 else "userns")


def without_isolation_warning(out: str) -> str:
    """Where no namespaces exist, every result starts with a warning line saying so."""
    return out.split("]\n", 1)[1] if out.startswith("[sandbox: no OS isolation") else out


def test_prints_come_back_and_script_errors_are_results_not_tool_errors():
    py = lambda args: without_isolation_warning(tool()(args))
    assert py({"code": "print(sum(range(101)))"}).strip() == "5050"
    out = py({"code": "import sys\nprint('before')\nsys.stderr.write('warn\\n')\n1/0"})
    assert out.startswith("before\n[stderr]\nwarn\nTraceback") and "ZeroDivisionError" in out
    assert out.rstrip().endswith("[exit code 1]")
    assert "print()" in py({"code": "x = 1"})  # no output: says how to see results


@needs_isolation
@isolated
def test_each_call_is_a_fresh_process_in_its_own_writable_temp_dir(mode):
    py = tool(mode)
    out = py({"code": "import os\nopen('state.txt', 'w').write('hi')\nprint(os.getcwd(), sorted(os.listdir('.')))"})
    assert out.strip() == "/home/sandbox ['main.py', 'state.txt']"
    assert "False" in py({"code": "import os\nprint(os.path.exists('state.txt'))"})


@needs_isolation
@isolated
def test_files_outside_the_sandbox_cannot_be_read_or_written(mode, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-42")
    here = os.path.abspath(__file__)
    code = f"""
import os
for p in [{str(secret)!r}, '/etc/passwd', '/etc/shadow', '/root/.bashrc', {here!r}, '/proc/1/root/etc/passwd',
          '/home/sandbox/../../etc/hostname']:
    try:
        print(p, 'READ', open(p).read()[:40])
    except OSError as e:
        print(p, 'DENIED', type(e).__name__)
for p in ['/usr/evil', {str(tmp_path / 'planted')!r}]:
    try:
        open(p, 'w').write('x'); print(p, 'WROTE')
    except OSError as e:
        print(p, 'DENIED', type(e).__name__)
print(sorted(os.listdir('/')))
"""
    out = tool(mode)({"code": code})
    assert "READ" not in out and "WROTE" not in out and out.count("DENIED") == 9, out
    assert "TOPSECRET" not in out and "root:x:0:0" not in out
    assert not (tmp_path / "planted").exists()
    top = set(eval(out.strip().splitlines()[-1]))  # the listing the script printed
    assert top <= {"bin", "sbin", "lib", "lib64", "lib32", "libx32", "usr", "dev", "proc", "tmp", "home", "etc",
                   "root", "work", "opt"}


@needs_isolation
@isolated
def test_there_is_no_network_not_even_the_hosts_loopback(mode):
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(srv.accept())
            except OSError:
                pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    code = f"""
import socket
for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:
    try:
        socket.create_connection(addr, timeout=1); print(addr, 'CONNECTED')
    except OSError as e:
        print(addr, 'BLOCKED', e)
try:
    socket.getaddrinfo('example.com', 80); print('DNS OK')
except OSError as e:
    print('DNS BLOCKED', e)
"""
    try:
        out = tool(mode)({"code": code})
        time.sleep(0.3)
    finally:
        stop.set()
        th.join()
        srv.close()
    assert "CONNECTED" not in out and "DNS OK" not in out and out.count("BLOCKED") == 4, out
    assert accepted == []


# As root the strongest mode is "root"; a user namespace made by root maps to uid 0, which RLIMIT_NPROC does
# not hold (only the wall clock would), so "userns" is tested where it is really used: by non-root users.
FORK_MODES = [m for m in ISOLATED if m == "root"] if os.geteuid() == 0 else ISOLATED


@pytest.mark.skipif(not FORK_MODES, reason="no namespace isolation on this machine")
@pytest.mark.parametrize("mode", FORK_MODES or ["root"])
def test_fork_bomb_is_stopped_and_leaves_no_process(mode):
    bomb = "import os\nwhile True:\n    os.fork()"
    with pytest.raises(ToolError, match=r"stopped by the sandbox: process limit \(32 processes\)"):
        make_python_tool(Limits(timeout_s=5, max_procs=32), isolation=mode)({"code": bomb})
    t0 = time.monotonic()
    r = run_code(bomb, Limits(timeout_s=5, max_procs=32), isolation=mode)
    assert r.violation == "process limit (32 processes)" and time.monotonic() - t0 < 5
    if mode == "root":  # the bomb ran as a fresh unprivileged uid: nothing of it is left
        assert r.uid >= 100_000 and [p for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) == r.uid] == []


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@needs_isolation
@isolated
def test_background_processes_die_with_the_script_even_in_a_new_session(mode):
    marker = f"{uuid.uuid4().int % 10**9}"
    code = (f"import subprocess\nsubprocess.Popen(['sleep', '600', '{marker}'], start_new_session=True)\n"
            f"subprocess.Popen(['sleep', '601', '{marker}'])\nprint('spawned')")
    assert tool(mode)({"code": code}).strip() == "spawned"
    for _ in range(50):
        if not _pids_with(marker):
            break
        time.sleep(0.05)
    assert _pids_with(marker) == []


@pytest.mark.parametrize("mode", [*ISOLATED, "none"])
def test_memory_bomb_is_a_tool_error(mode):
    with pytest.raises(ToolError, match=r"memory limit \(256 MB"):
        make_python_tool(Limits(timeout_s=10, memory_mb=256), isolation=mode)(
            {"code": "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"})


@isolated
def test_scripts_can_start_dozens_of_threads_under_the_memory_limit(mode):
    code = ("import threading\ngo = threading.Event()\n"
            "def work():\n    bytearray(10**5)\n    go.wait()\n"  # each allocates, and all are alive at once
            "ts = [threading.Thread(target=work) for _ in range(40)]\n"
            "[t.start() for t in ts]\ngo.set()\n[t.join() for t in ts]\nprint('ok', len(ts))")
    assert "ok 40" in make_python_tool(Limits(timeout_s=10, memory_mb=1024), isolation=mode)({"code": code})


@isolated
def test_scripts_can_use_multiprocessing_queues_and_pools(mode):
    """Their locks are POSIX semaphores, which need a /dev/shm (a tmpfs inside the sandbox's disk limit)."""
    code = ("import multiprocessing as mp\n"
            "def square(x):\n    return x * x\n"
            "if __name__ == '__main__':\n    q = mp.Queue()\n    q.put('queued')\n    print(q.get())\n"
            "    with mp.Pool(2) as pool:\n        print(pool.map(square, range(4)))")
    out = make_python_tool(Limits(timeout_s=20, memory_mb=1024), isolation=mode)({"code": code})
    assert "queued" in out and "[0, 1, 4, 9]" in out, out


@pytest.mark.parametrize("mode", [*ISOLATED, "none"])
def test_infinite_loop_is_killed_at_the_wall_clock_limit(mode):
    t0 = time.monotonic()
    with pytest.raises(ToolError, match=r"wall-clock timeout \(1 s\)") as e:
        make_python_tool(Limits(timeout_s=1), isolation=mode)({"code": "print('start')\nwhile True: pass"})
    assert time.monotonic() - t0 < 3 and "start" in str(e.value)


def test_cpu_time_limit_stops_a_busy_script_before_the_wall_clock():
    with pytest.raises(ToolError, match=r"CPU time limit \(1 s\)") as e:
        make_python_tool(Limits(timeout_s=20, cpu_s=1))({"code": "print('spinning')\nwhile True: pass"})
    assert "spinning" in str(e.value)  # output seen before the kill is kept (unbuffered)


@pytest.mark.parametrize("mode", [*ISOLATED, "none"])
def test_100_mb_of_output_is_cut_off_and_reported(mode):
    t0 = time.monotonic()
    with pytest.raises(ToolError, match=r"output limit \(1048576 bytes\)") as e:
        tool(mode)({"code": "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))"})
    assert len(str(e.value)) < FAST.result_chars + 500 and "characters cut" in str(e.value)
    assert time.monotonic() - t0 < FAST.timeout_s


@needs_isolation
def test_filling_the_disk_fails_inside_the_sandbox_only():
    out = make_python_tool(Limits(disk_mb=16))({"code": "f = open('big', 'wb')\nwhile True: f.write(b'x' * 2**20)"})
    assert "No space left on device" in out or "File too large" in out


def test_without_isolation_the_result_says_so():
    out = tool("none")({"code": "print('hi')"})
    assert out.startswith("[sandbox: no OS isolation here") and out.rstrip().endswith("hi")
