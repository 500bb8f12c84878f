"""Run an untrusted Python program in a bubblewrap sandbox, bounded in time, memory, processes and output.

Isolation (mode "bwrap"): new user, pid, net, ipc and uts namespaces; read-only /usr (+ /lib, /bin, the
interpreter's prefix); a private size-limited tmpfs /tmp as cwd; an empty environment; no further user
namespaces. Limits: rlimits on CPU seconds, address space, processes, file size and open files, a wall-clock
timeout, output caps; the whole process group is SIGKILLed at the end, and bwrap's pid namespace takes every
descendant with it when its init dies. Mode "rlimit" keeps only the rlimits and the group kill: weaker, and
used only when the config chooses it explicitly.
"""
from __future__ import annotations

import functools
import glob
import os
import resource
import selectors
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from npr_async.verifiers.reaper import (become_subreaper, count_own_processes, drop_privileges, fresh_uid,
                                        kill_and_reap_uid, kill_group)

BWRAP = shutil.which("bwrap") or "/usr/bin/bwrap"
WORKDIR_PREFIX = "npr-sbx-"  # + the pid running the sandbox, so a pool can clean up after a killed worker


def remove_workdirs(pid: int) -> int:
    """Delete the program directories a SIGKILLed process `pid` could not clean up itself."""
    dirs = glob.glob(os.path.join(tempfile.gettempdir(), f"{WORKDIR_PREFIX}{pid}-*"))
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return len(dirs)


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here and the weaker rlimit-only mode was not chosen."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512  # address space (RLIMIT_AS) of every process in the sandbox
    max_procs: int = 32  # RLIMIT_NPROC, counted per (outer) uid: each run gets its own uid when we are root
    file_mb: int = 16  # RLIMIT_FSIZE: the largest file a program may write
    tmp_mb: int = 64  # size of the private /tmp
    open_files: int = 64
    output_kb: int = 256  # stdout and stderr are each cut here and the run is killed


class Result(msgspec.Struct, kw_only=True):
    returncode: int | None  # None: killed by us (timeout or output limit)
    stdout: str
    stderr: str
    timed_out: bool = False
    output_limited: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_limited


def sandbox_python(configured: str = "") -> str:
    """The interpreter to run inside: the configured one, else the system python3, else our own (real path)."""
    if configured:
        return configured
    if os.path.exists("/usr/bin/python3"):  # lives under /usr: no extra bind needed
        return "/usr/bin/python3"
    return os.path.realpath(sys.executable)


def _python_binds(python: str) -> list[str]:
    """Read-only bind of an interpreter's install prefix outside /usr (e.g. pyenv, a venv's base)."""
    real = os.path.realpath(python)
    if real.startswith("/usr/"):
        return []
    prefix = str(Path(real).parent.parent)  # <prefix>/bin/python3.x -> <prefix> holds lib/python3.x
    if os.geteuid() == 0 and not _world_reachable(real):
        # bwrap runs as the sandbox's unprivileged uid (see reaper.fresh_uid): it must reach the prefix itself
        raise SandboxUnavailable(
            f"the sandbox interpreter {real} is not readable by an unprivileged user (e.g. it lives under "
            f"/root); set verifier.sandbox_python to a world-readable python such as /usr/bin/python3")
    return ["--ro-bind", prefix, prefix]


def _world_reachable(path: str) -> bool:
    parts = Path(path).parts
    for k in range(1, len(parts)):
        if not os.stat(os.path.join(*parts[:k])).st_mode & stat.S_IXOTH:
            return False
    return os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH) == (stat.S_IROTH | stat.S_IXOTH)


def _root_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        if os.path.islink(d):  # merged-/usr systems: /lib -> usr/lib
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/localtime"):  # the minimal /etc a python needs
        args += ["--ro-bind-try", f, f]
    return args


def bwrap_argv(python: str, workdir: str, limits: Limits, uid_inside: int = 1000) -> list[str]:
    """bwrap's arguments up to the command (the interpreter and its arguments follow)."""
    return [
        BWRAP, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--disable-userns", "--die-with-parent", "--new-session", "--clearenv",
        "--uid", str(uid_inside), "--gid", str(uid_inside), "--hostname", "sandbox",
        *_root_binds(), *_python_binds(python),
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp",
        "--ro-bind", workdir, "/input", "--chdir", "/tmp",
        "--remount-ro", "/dev", "--remount-ro", "/",  # bwrap's root and /dev are tmpfs: only /tmp stays writable
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
    ]


@functools.lru_cache(maxsize=4)
def bwrap_works(python: str) -> str | None:
    """None when a trivial program runs under bwrap here, else the reason it cannot."""
    if not os.path.exists(BWRAP):
        return f"bubblewrap not found ({BWRAP}); install the Debian package `bubblewrap`"
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        uid = fresh_uid()
        become_subreaper()
        try:
            argv = [*bwrap_argv(python, d, Limits()), os.path.realpath(python), "-I", "-c", "print(1)"]
            r = subprocess.run(argv, capture_output=True, timeout=30, preexec_fn=drop_privileges(uid))
        except SandboxUnavailable as e:
            return str(e)
        except (OSError, subprocess.SubprocessError) as e:
            return f"bubblewrap failed to start: {e}"
        finally:
            if uid is not None:
                kill_and_reap_uid(uid)
    if r.returncode != 0 or r.stdout.strip() != b"1":
        return f"bubblewrap cannot run here (rc {r.returncode}): {r.stderr.decode(errors='replace')[-300:]}"
    return None


def _limit_fn(limits: Limits, uid: int | None):
    # Not root: the process count is shared with our own uid, so allow what is running already on top.
    base = 0 if uid is not None else count_own_processes()

    def pre() -> None:
        mb = 1 << 20
        for res, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb * mb),
                           (resource.RLIMIT_NPROC, base + limits.max_procs),
                           (resource.RLIMIT_FSIZE, limits.file_mb * mb), (resource.RLIMIT_NOFILE, limits.open_files),
                           (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (value, value))
        drop_privileges(uid)()
    return pre


def run_python(program: str, stdin: str = "", limits: Limits = Limits(), mode: str = "bwrap",
               python: str = "") -> Result:
    """Run `program` (Python source) with `stdin`; never raises for anything the program does."""
    python = sandbox_python(python)
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as workdir:
        os.chmod(workdir, 0o755)  # readable by the sandbox's unprivileged uid
        prog = Path(workdir, "main.py")
        prog.write_text(program)
        prog.chmod(0o644)
        if mode == "bwrap":
            why = bwrap_works(python)
            if why:
                raise SandboxUnavailable(why + " (set verifier.sandbox: rlimit to accept the weaker rlimit-only mode)")
            argv = [*bwrap_argv(python, workdir, limits), os.path.realpath(python), "-I", "/input/main.py"]
            cwd, env = "/", {}
        elif mode == "rlimit":
            argv, cwd, env = [python, "-I", str(prog)], workdir, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        else:
            raise ValueError(f"unknown sandbox mode {mode!r} (bwrap | rlimit)")
        uid = fresh_uid()
        become_subreaper()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, preexec_fn=_limit_fn(limits, uid))
        try:
            return _communicate(proc, stdin.encode(), limits)
        finally:
            kill_group(proc, uid)


def _communicate(proc: subprocess.Popen, data: bytes, limits: Limits) -> Result:
    """Feed stdin and read both pipes until exit, the wall deadline or the output cap, whichever first."""
    start = time.monotonic()
    deadline = start + limits.wall_s
    cap = limits.output_kb << 10
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = limited = False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=left):
            f = key.fileobj
            if f is proc.stdin:
                try:
                    n = os.write(f.fileno(), data[:65536])
                except (BrokenPipeError, OSError):
                    n = len(data)
                data = data[n:]
                if not data:
                    sel.unregister(f)
                    f.close()
                continue
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                sel.unregister(f)
                continue
            bufs[f] += chunk
            if len(bufs[f]) > cap:
                limited = True
        if limited:
            break
    if timed_out or limited:
        code = None
    else:
        try:
            code = proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code, timed_out = None, True
    sel.close()
    out, err = (bytes(bufs[f][:cap]).decode(errors="replace") for f in (proc.stdout, proc.stderr))
    return Result(returncode=code, stdout=out, stderr=err, timed_out=timed_out, output_limited=limited,
                  wall_s=time.monotonic() - start)
