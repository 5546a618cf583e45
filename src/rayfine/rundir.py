"""One writer per run directory.

`rayfine train`, `tune` and `run` continue whatever their run directory holds. Two of them on the
same directory at once (the same command started twice, a `--resume` while the search still runs)
would both resume from the same checkpoints and delete each other's: Ray Train's checkpoint
manager then fails on a checkpoint the other process removed, and the run directory holds a mix of
both. So each command holds an exclusive ``flock`` on the run directory itself (no lock file is
added to it) while it writes there; a second one stops at once, before Ray starts, and touches
nothing. The kernel drops the lock when its holder exits, however it ends (SIGKILL included), so
a killed run can be resumed right away.

``rayfine.train.fit`` and ``rayfine.tune.run_search`` hold the lock too (``holding``), so Python
callers are guarded as the commands are; inside a command, which holds it already from before Ray
starts, they go on under the command's lock.

On a filesystem without ``flock`` (some network or FUSE mounts) the commands run unguarded, as
before.

Also here: where each command keeps the config it ran with (``save_config``, ``saved_config``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rayfine.errors import RayfineError

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self


class RunDirBusy(RayfineError):
    """Another rayfine command is writing to this run directory."""


# The run directories this process holds, each with the thread that took it (for ``holding``).
_HELD: dict[Path, int] = {}


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds ``run_dir`` (created if missing, and removed again on
    release if it is still empty) for this process, or raises RunDirBusy at once, also when this
    process holds it already. ``release()`` lets it go before the block ends."""

    def __init__(self, run_dir: Path, command: str):
        self.run_dir, self.command = Path(run_dir), command
        self._fd: int | None = None
        self._held: Path | None = None
        self._created: list[Path] = []

    def acquire(self) -> Self:
        # The run directory and the folders above it this makes (a new runs_dir), deepest first.
        created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
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
        self._fd, self._held, self._created = fd, self.run_dir.resolve(), created
        _HELD[self._held] = threading.get_ident()
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD.pop(self._held, None)
            # The directories made for a command that then wrote nothing (it was refused) go, the
            # runs_dir made for it too; the first that is not empty stays, and those above it.
            with contextlib.suppress(OSError):
                for path in self._created:
                    os.rmdir(path)
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = self._held = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def holding(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir`` for the block (``RunDirLock``), unless this thread holds it already: the
    ``rayfine`` command around ``fit`` or ``run_search`` took it before Ray started."""
    if _HELD.get(Path(run_dir).resolve()) == threading.get_ident():
        yield
        return
    with RunDirLock(run_dir, command):
        yield


def command_config(run_dir: Path, command: str) -> Path:
    """<run>/<command>/config.yaml: the config ``rayfine <command>`` keeps in its own folder. A
    search writes it once it has read its data, so tune/config.yaml marks a search."""
    return run_dir / command / "config.yaml"


def saved_config(run_dir: Path, command: str) -> Path:
    """The config ``rayfine train`` (command "train") or ``rayfine tune`` ("tune") last ran with in
    ``run_dir``: <run>/<command>/config.yaml, or for a run directory written before each command
    kept its own, <run>/config.yaml. (<run>/config.yaml is the last command's: a training run and
    a search under one name may differ in tune.*, scaling.*, ...)"""
    own = command_config(run_dir, command)
    return own if own.is_file() else run_dir / "config.yaml"


def save_config(run_dir: Path, command: str, config_yaml: str) -> None:
    """The resolved config in <run>/config.yaml and in <run>/<command>/config.yaml."""
    (run_dir / command).mkdir(parents=True, exist_ok=True)
    for path in (run_dir / "config.yaml", command_config(run_dir, command)):
        write_atomic(path, config_yaml)


def jsonl_records(text: str, path) -> list[dict]:
    """The records of a JSON Lines run file's ``text`` (metrics.jsonl, a trial's epochs.jsonl). A last
    line without its newline is not a record yet: still being appended, or cut short by a kill or a
    full disk (``append_line`` removes it before the next record). A line that is not JSON is a
    RayfineError naming the file and the line."""
    records = []
    for number, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RayfineError(f"{path}: line {number} is not JSON ({e.msg}, column {e.colno}); it was edited "
                                   "or damaged: remove that line") from None
            if not isinstance(record, dict) or "epoch" not in record:
                raise RayfineError(f"{path}: line {number} is not an epoch's record (a JSON object with an epoch); "
                                   "it was edited or damaged: remove that line")
            records.append(record)
    return records


def read_saved_config(path: Path) -> dict:
    """A config.yaml of the run directory as its mapping; a RayfineError naming the file when it is
    not one (edited by hand, damaged), where YAML's error or a type error named none."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raw = e
    if not isinstance(raw, dict):
        what = f"not YAML ({str(raw).splitlines()[0]})" if isinstance(raw, yaml.YAMLError) else "not a rayfine config"
        raise RayfineError(f"{path} is {what}; it was edited or damaged: write the config again (`rayfine validate "
                           "CONFIG > that file`), or remove the run directory to start afresh")
    return raw


def complete_length(path: Path | str) -> int:
    """The bytes of ``path`` up to its last newline: where ``append_line`` writes the next record."""
    with open(path, "rb") as f:
        data = f.read()
    return data.rfind(b"\n") + 1


def append_line(path: Path | str, line: str) -> None:
    """Append one record to a local JSON Lines run file. A last line cut short before (a disk that
    filled mid-write, a kill) is removed first: appended to, it would merge with the new record into
    a line no reader can parse, and every later continuation and report would fail on it."""
    with open(path, "a+b") as f:  # every write goes to the end (O_APPEND)
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write(line.encode() + b"\n")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then os.replace. A process
    killed (or a disk filled) mid-write leaves the previous file, or none, never a truncated one
    that a later command (a continuation, `rayfine report`) fails to parse."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # Created as open() would create the file itself (0666 less the umask), not mkstemp's 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            # A file written again keeps its mode: a config.yaml the user made private (chmod 600: a
            # tracking password stays in it) stays private.
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
