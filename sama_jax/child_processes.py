"""Child processes that die with the process that started them.

    proc = child_processes.popen(["sama-train", ...])   # subprocess.Popen; on the parent's death,
                                                        # however it dies, the child gets SIGTERM
    pool = ProcessPoolExecutor(..., initializer=child_processes.worker_init, initargs=(os.getpid(),))

Without this a kill -9 of an orchestrator (sama-demo) or of the shard builder leaves its children
running: a training phase that races the rerun's own in the same workdir, workers that keep writing
.tmp files and then block on a dead pipe. Linux: PR_SET_PDEATHSIG; elsewhere a thread that watches
the parent pid. A command started by popen learns its parent's pid from SAMA_DIE_WITH_PARENT and
arms itself in cli.run (no preexec_fn: forking a process with threads and running Python in the
child can deadlock). Pool workers also ignore Ctrl-C: the parent decides what an interrupt does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time

ENV = "SAMA_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """This process gets `sig` when `parent` dies (exits at once if it is already gone)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        ok = False
    if not ok:

        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), sig)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def worker_init(parent: int) -> None:
    """Pool worker initializer: ignore Ctrl-C (sent to the whole process group) and die with the
    parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


def popen(args, *, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """subprocess.Popen of a sama command that gets SIGTERM (it saves and exits, as on any SIGTERM)
    when this process dies. Call it from the main thread: Linux signals the child when the thread
    that started it exits."""
    env = dict(os.environ if env is None else env)
    env[ENV] = str(os.getpid())
    return subprocess.Popen(args, env=env, **kwargs)


def arm_from_environment() -> None:
    """In a command started by popen: die with that parent. The variable is consumed, so the
    command's own children are not tied to the grandparent."""
    parent = os.environ.pop(ENV, "")
    if parent.isdigit():
        die_with_parent(int(parent), signal.SIGTERM)
