"""Crash-safe outputs: build in a temporary sibling, rename into place at the end.

The temporary folder is named `.<out>.tmp-<host>-<pidns>-<pid>-<random>` (pidns: the PID
namespace, which containers on one host may not share), so a later run for the same output can
tell a folder left by a killed process (same host and namespace, pid no longer running: removed)
from one another process is still writing (kept).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

log = logging.getLogger("qwen_merge_mcore")

# Below this many free bytes a failed write is reported as a full file system (torch's writer,
# for one, reports ENOSPC only as "file write failed").
FULL_DISK_BYTES = 1 << 20


class OutputExistsError(FileExistsError):
    pass


class OutputPathError(OSError):
    """An output that cannot be written; the message names the path and the cause."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputOverlapError(ValueError):
    """The output would replace or contain one of the command's inputs."""


def check_output_not_input(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is an input or a folder above one: replacing it would delete the input."""
    target = Path(out).resolve()
    for src in inputs:
        if src is None:
            continue
        source = Path(src).resolve()
        if source == target or target in source.parents:
            what = "is" if source == target else "contains"
            raise InputOverlapError(f"{flag} {out} {what} the input {src}: writing it would delete the input; "
                                    "choose another output folder")


def os_error_message(err: OSError) -> str:
    """One line: the path(s) and the cause, without the errno noise."""
    if isinstance(err, OutputPathError) or not err.strerror:
        return str(err)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths}: {err.strerror}" if paths else err.strerror


def _machine() -> str:
    """This host and PID namespace: where a pid means this process and no other."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (macOS): the host alone
        namespace = 0
    return f"{socket.gethostname()}-{namespace}"


def owner_tag() -> str:
    """`<host>-<pidns>-<pid>` of this process, as it appears in the temporary folders it creates."""
    return f"{_machine()}-{os.getpid()}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temporary folders of `out` left by dead processes of this host; return them.

    Folders of live processes are kept silently; those of other hosts (or containers) or of unknown
    owner are kept and named in a warning: on a shared file system only their host can tell
    whether their process is dead. A previous output that a killed run had moved aside and not yet
    replaced (`.<out>.old-*` while `out` is missing) is moved back, not removed.
    """
    import glob

    removed, machine = [], _machine()
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in sorted(out.parent.glob(glob.escape(prefix) + "*")):
            owner = _owner(path.name[len(prefix):])
            if owner is None:
                log.warning("%s looks like an unfinished output of %s by an unknown process; remove it if no job "
                            "is writing there", path, out)
            elif owner[0] != machine:
                log.warning("%s is an unfinished output of process %d on %s; remove it if that job is gone",
                            path, owner[1], owner[0])
            elif _pid_running(owner[1]):
                continue
            elif kind == "old" and not out.exists():
                path.rename(out)
                log.warning("restored %s from %s: a killed run had moved it aside", out, path)
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                log.warning("removed %s: an unfinished output of process %d, which is no longer running",
                            path, owner[1])
    return removed


def _owner(tag: str) -> tuple[str, int] | None:
    """(`<host>-<pidns>`, pid) from `<host>-<pidns>-<pid>-<suffix>` (hosts may hold '-', the other
    parts do not); None if the tag is not of that form."""
    parts = tag.rsplit("-", 3)
    if len(parts) != 4 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return f"{parts[0]}-{parts[1]}", int(parts[2])


def _prepare(out: Path, overwrite: bool) -> None:
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        what = f"output {out}" if existing == out else f"{existing}, a folder of output {out},"
        raise OutputPathError(f"{what} exists and is a file, not a folder", errno.ENOTDIR)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot create the folder {err.filename or parent} for {out}: {err.strerror}",
                              err.errno) from None


def _write_failure(err: BaseException, out: Path, tmp: Path) -> OutputPathError | None:
    """The user-facing error for a write into `tmp` that failed on the file system, else None."""
    try:
        free = shutil.disk_usage(tmp if tmp.exists() else out.parent).free
    except OSError:
        free = None
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(err, (OSError, RuntimeError))
                                               and free is not None and free < FULL_DISK_BYTES):
        return OutputPathError(f"cannot write {out}: no space left on the file system of {out.parent} "
                               f"({free if free is not None else '?'} bytes free); nothing was kept", errno.ENOSPC)
    # Other OS errors are the output's only when they name a path inside the temporary folder
    # (an input that cannot be read is reported as it is).
    if isinstance(err, OSError) and not isinstance(err, OutputPathError) and err.strerror \
            and isinstance(err.filename, (str, bytes, os.PathLike)) \
            and Path(os.fsdecode(err.filename)).absolute().is_relative_to(tmp):
        return OutputPathError(f"cannot write {out}: {err.strerror}; nothing was kept", err.errno)
    return None


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out` in one rename.

    A crash or an exception leaves `out` untouched and removes the temporary folder, so a
    half-written result never looks complete; temporary folders of `out` left by killed processes
    are removed first. File-system failures (no space, read-only, not writable) are raised as
    OutputPathError naming the path and the cause.
    """
    out = Path(out).absolute()
    remove_stale_temps(out)  # first: it may move back a previous output, which --overwrite then guards
    _prepare(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{owner_tag()}-", dir=out.parent))
    except OSError as err:
        raise OutputPathError(f"cannot write {out}: {out.parent}: {err.strerror}", err.errno) from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the result should read like any new folder
    try:
        yield tmp
    except BaseException as err:
        failure = _write_failure(err, out, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from err
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{owner_tag()}-0")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_file(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` creates the file under a temporary name that is renamed to `path` once whole.
    The name `.<name>.tmp-<pid>` has another suffix, so a folder reader looking for `.jsonl` or
    `.safetensors` never sees a file being written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputPathError(f"cannot write {path}: {err.strerror}", err.errno) from None
