"""Adversarial programs, run only inside the bubblewrap sandbox: each yields a failed or timed-out verdict,
nothing of it survives the run, and the host is untouched."""
from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from npr_async.verifiers.code import CodeVerifier
from npr_async.verifiers.sandbox import Limits, Result, bwrap_works, run_python, sandbox_python

pytestmark = pytest.mark.skipif(bwrap_works(sandbox_python()) is not None, reason="bubblewrap cannot run here")

FAST = Limits(wall_s=2.0, cpu_s=2, memory_mb=256, max_procs=16, output_kb=64)


def _sandbox_processes(token: str = "/input/main.py") -> list[int]:
    """Host pids that belong to a sandbox: a private uid (>= 200000) or the program path in the command line."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
            if os.stat(f"/proc/{p}").st_uid >= 200_000 or token in cmd:
                found.append(int(p))
        except OSError:
            pass
    return found


@pytest.fixture(autouse=True)
def nothing_survives():
    before_tmp = {n for n in os.listdir("/tmp") if n.startswith("npr-sbx-")}
    yield
    time.sleep(0.05)
    assert _sandbox_processes() == []
    assert {n for n in os.listdir("/tmp") if n.startswith("npr-sbx-")} <= before_tmp  # workdirs removed


def _failed(r: Result) -> bool:
    return not r.ok


def test_benign_program_runs():
    r = run_python("import sys; print(sum(map(int, sys.stdin.read().split())))", "1 2 3\n", FAST)
    assert r.ok and r.stdout == "6\n"


def test_fork_bomb_is_capped_by_nproc():
    counter = run_python("import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                         "            import time; time.sleep(30)\n        n += 1\nexcept OSError:\n    print(n)\n",
                         limits=FAST)
    assert counter.returncode == 0 and int(counter.stdout) < FAST.max_procs  # RLIMIT_NPROC holds, even as root
    bomb = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                      limits=FAST)
    assert _failed(bomb) and bomb.timed_out


def test_memory_bomb():
    r = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n", limits=FAST)
    assert _failed(r) and "MemoryError" in r.stderr


def test_infinite_loop_hits_cpu_or_wall_limit():
    t = time.monotonic()
    r = run_python("while True:\n    pass\n", limits=Limits(wall_s=3.0, cpu_s=1))
    assert _failed(r) and time.monotonic() - t < 3.5  # RLIMIT_CPU (SIGXCPU/SIGKILL) before the wall clock


def test_sleeping_past_the_timeout():
    t = time.monotonic()
    r = run_python("import time\ntime.sleep(60)\n", limits=Limits(wall_s=1.0))
    assert r.timed_out and _failed(r) and time.monotonic() - t < 2.0


def test_children_left_running_are_killed():
    token = f"npr-marker-{uuid.uuid4().hex}"
    prog = ("import subprocess, sys, os\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{token}'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time\\nwhile 1: print(1, flush=True); time.sleep(.01)', '{token}'])\n"
            "print('parent done')\n")
    t = time.monotonic()
    r = run_python(prog, limits=FAST)
    assert r.stdout.startswith("parent done") or "parent done" in r.stdout
    assert time.monotonic() - t < FAST.wall_s + 0.5
    assert _sandbox_processes(token) == []  # the detached sleeper and the writer died with the pid namespace


def test_network_connect_fails():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    prog = ("import socket\nfor addr in [('127.0.0.1', %d), ('10.255.255.1', 80)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=1).close(); print('connected', addr)\n"
            "    except OSError as e:\n        print('refused', addr, e)\n" % port)
    v = CodeVerifier()
    verdict = v.verify({"tests": [{"input": "", "output": f"connected ('127.0.0.1', {port})"}]}, prog)
    assert not verdict.correct and verdict.details["failure"]["kind"] == "wrong_output"
    assert "connected" not in verdict.details["failure"]["stdout"]
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing reached the host's loopback
    listener.close()


def test_reading_outside_the_sandbox(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    secret.chmod(0o644)
    paths = [str(secret), "/root", "/work", "/work/main/pyproject.toml", "/etc/passwd", "/etc/hostname",
             f"/proc/{os.getpid()}/environ", os.path.expanduser("~/.bashrc")]  # host pids are invisible
    prog = (f"import os\nfor p in {paths!r}:\n    try:\n"
            "        print(p, os.listdir(p) if os.path.isdir(p) else open(p).read()[:40])\n"
            "    except OSError as e:\n        print(p, 'DENIED', type(e).__name__)\n")
    r = run_python(prog, limits=FAST)
    assert r.ok, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(paths) and all("DENIED" in line for line in lines), r.stdout
    assert "TOP-SECRET" not in r.stdout


def test_writing_outside_tmp():
    token = uuid.uuid4().hex
    targets = [f"/usr/{token}", f"/input/{token}", f"/etc/{token}", f"/{token}", f"/work/main/{token}",
               f"/root/{token}", f"/bin/{token}", f"/dev/shm/{token}", f"/dev/{token}"]
    prog = (f"wrote = []\nfor p in {targets!r}:\n    try:\n        open(p, 'w').write('x'); wrote.append(p)\n"
            "    except OSError:\n        pass\nopen('/tmp/ok', 'w').write('fine')\nprint('wrote', wrote)\n")
    verdict = CodeVerifier().verify({"tests": [{"input": "", "output": f"wrote {targets!r}"}]}, prog)
    assert not verdict.correct and verdict.details["failure"]["stdout"].strip() == "wrote []"
    assert not any(os.path.exists(p) for p in (f"/usr/{token}", f"/etc/{token}", f"/{token}",
                                                f"/work/main/{token}", f"/root/{token}", f"/bin/{token}"))


def test_file_size_and_tmp_are_bounded():
    r = run_python("f = open('/tmp/big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))\n", limits=FAST)
    assert _failed(r) and ("File too large" in r.stderr or "No space" in r.stderr or r.returncode == -25)


def test_giant_output_is_truncated():
    r = run_python("while True:\n    print('x' * 4096)\n", limits=FAST)
    assert r.output_limited and _failed(r) and len(r.stdout) <= FAST.output_kb << 10


def test_killing_the_parent():
    prog = ("import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n        pass\nprint('still here')\nimport time; time.sleep(60)\n")
    t = time.monotonic()
    verdict = CodeVerifier(_Cfg(code_timeout_s=1.5)).verify({"tests": [{"input": "", "output": "x"}]}, prog)
    assert not verdict.correct and verdict.details["failure"]["kind"] in ("timeout", "runtime_error")
    assert time.monotonic() - t < 3.0 and os.getpid() > 0  # we, the host side, are alive


def test_refuses_without_bubblewrap(monkeypatch):
    import npr_async.verifiers.sandbox as sb

    monkeypatch.setattr(sb, "BWRAP", "/nonexistent/bwrap")
    sb.bwrap_works.cache_clear()
    try:
        with pytest.raises(sb.SandboxUnavailable, match="rlimit"):
            sb.run_python("print(1)")
        r = sb.run_python("print(1)", mode="rlimit")  # the weaker mode, chosen explicitly, still runs
        assert r.ok and r.stdout == "1\n"
    finally:
        sb.bwrap_works.cache_clear()


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_our_own_interpreter_outside_usr():
    """Bound read-only when an unprivileged user can reach it; refused with a clear error when not (as root,
    bwrap runs under the sandbox's private uid, which cannot enter /root where pyenv lives here)."""
    import sys

    import npr_async.verifiers.sandbox as sb

    real = os.path.realpath(sys.executable)
    if real.startswith("/usr/"):
        pytest.skip("our interpreter lives under /usr")
    prog = ("import sys, os\nprint(sys.version.split()[0])\n"
            "print(os.path.exists(os.path.expanduser('~root/.bashrc')), os.path.exists('/work'))\n")
    if os.geteuid() == 0 and not sb._world_reachable(real):
        with pytest.raises(sb.SandboxUnavailable, match="sandbox_python"):
            run_python(prog, limits=FAST, python=real)
        return
    r = run_python(prog, limits=FAST, python=real)
    assert r.ok, r.stderr
    assert r.stdout.splitlines() == [sys.version.split()[0], "False False"]
