"""Who a sandbox runs as, and making sure nothing of it outlives the run (see sandbox.py).

- A private uid per run (when we are root): RLIMIT_NPROC is not enforced for uid 0 and is counted per uid.
- Cleanup: SIGKILL the run's process group, then every process of its uid; as a child subreaper we inherit
  bwrap's namespace init (bwrap's outer process exits without reaping it) and reap it, so not even a
  zombie survives. A pool that kills a worker mid-run reaps the orphans with `reap_adopted_sandboxes`.
"""
from __future__ import annotations

import functools
import os
import secrets
import signal
import subprocess


def fresh_uid() -> int | None:
    """As root, run each sandbox as its own unused uid: RLIMIT_NPROC is not enforced for uid 0, and it
    is counted per uid, so a private uid makes the process limit exact and independent of other runs."""
    return 200_000 + secrets.randbelow(1 << 24) if os.geteuid() == 0 else None


def drop_privileges(uid: int | None):
    def pre() -> None:
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return pre


def count_own_processes() -> int:
    uid, n = os.getuid(), 0
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.stat(f"/proc/{p}").st_uid == uid:
                n += 1
        except OSError:
            pass
    return n


def kill_group(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the session we started (bwrap, or the program in rlimit mode), then anything left of its uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for f in (proc.stdin, proc.stdout, proc.stderr):
        try:
            f.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if uid is not None:  # programs that called setsid() left our group; their private uid still names them
        kill_and_reap_uid(uid)


def kill_and_reap_uid(uid: int) -> None:
    # bwrap's outer process exits without reaping its namespace init; as a child subreaper we inherit that
    # zombie (and any orphan) and reap it here, so not even a zombie outlives the run.
    me = os.getpid()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.stat(f"/proc/{p}").st_uid != uid:
                continue
            os.kill(int(p), signal.SIGKILL)
            ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            if ppid == me:
                os.waitpid(int(p), 0)
        except (OSError, ValueError, IndexError):
            pass


def reap_adopted_sandboxes(passes: int = 10) -> int:
    """Kill and reap the sandbox processes a killed worker left to us (we are its subreaper): our children
    that run under another uid. Repeats while killing one re-parents another (bwrap's namespace init)."""
    me, uid, total = os.getpid(), os.getuid(), 0
    for _ in range(passes):
        found = 0
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
                if int(fields[1]) != me or os.stat(f"/proc/{p}").st_uid == uid:
                    continue
                os.kill(int(p), signal.SIGKILL)
                os.waitpid(int(p), 0)
                found += 1
            except (OSError, ValueError, IndexError):
                pass
        total += found
        if not found:
            break
    return total


_PR_SET_CHILD_SUBREAPER = 36


@functools.lru_cache(maxsize=1)
def become_subreaper() -> bool:
    """Orphans of our sandboxes re-parent to this process instead of init (which may reap late)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
