"""One process at a time in a directory: an exclusive flock on DIR/.lock, the owner's pid inside.

    lock = dir_lock.acquire(workdir, busy="is in use by")   # ValueError naming the live pid
    ...                                                     # held while `lock` stays open
    lock.close()                                            # (or the process exits, however)

The kernel drops an flock when its holder dies, kill -9 included, so a lock file left behind by a
killed run is simply taken over; the pid inside only names the live owner in the refusal.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import IO

LOCK = ".lock"


def acquire(directory: str, *, busy: str = "is in use by", mark: bool = True) -> IO:
    """Creates `directory` if needed and locks it; mark=False leaves the pid to mark_owner (a caller
    that may still refuse, and then leaves the lock file as it found it)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is a file, not a directory")
    os.makedirs(directory, exist_ok=True)
    handle = open(os.path.join(directory, LOCK), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(f"{directory} {busy} pid {owner}; wait for it to finish or stop it") from None
    if mark:
        mark_owner(handle)
    return handle


def mark_owner(handle: IO) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
