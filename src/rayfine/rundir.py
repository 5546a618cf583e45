"""One writer per run directory.

`rayfine train`, `tune` and `run` continue whatever their run directory holds. Two of them on the
same directory at once (the same command started twice, a `--resume` while the search still runs)
would both resume from the same checkpoints and delete each other's: Ray Train's checkpoint
manager then fails on a checkpoint the other process removed, and the run directory holds a mix of
both. So each command holds an exclusive ``flock`` on the run directory itself (no lock file is
added to it) while it writes there; a second one stops at once, before Ray starts, and touches
nothing. The kernel drops the lock when its holder exits, however it ends (SIGKILL included), so
a killed run can be resumed right away.

On a filesystem without ``flock`` (some network or FUSE mounts) the commands run unguarded, as
before.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rayfine.errors import RayfineError

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self


class RunDirBusy(RayfineError):
    """Another rayfine command is writing to this run directory."""


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds ``run_dir`` (created if missing) for this process, or
    raises RunDirBusy at once. ``release()`` lets it go before the block ends."""

    def __init__(self, run_dir: Path, command: str):
        self.run_dir, self.command = Path(run_dir), command
        self._fd: int | None = None

    def acquire(self) -> Self:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirBusy(
                    f"{self.run_dir} is in use by another rayfine train, tune or run command; wait for it to end "
                    f"(or stop it) before `rayfine {self.command}` continues this run, or give this one another "
                    "name (--set name=...) or --runs-dir") from None
            return self  # no flock on this filesystem: unguarded
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
