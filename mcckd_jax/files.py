"""Writing finished files all or nothing: the one way the project puts results on disk.

A file is written to a temporary sibling `.<name>.<random>.tmp` (in the target's folder, so
that the rename stays on one filesystem and is atomic), flushed to disk, then renamed over the
target: a reader sees the previous file or the new one, never half of one. `write_together`
does the same for files that only make sense together (prepared data and its report): every
file is staged before any is renamed, and a failed rename undoes the ones before it.

Temporary files are created with mode 0o666 so that the process umask applies, as for any
other new file (`tempfile.mkstemp` makes them 0o600, and the rename would keep that).

Errors are `WriteError` (an OSError) or ValueError; `str(error)` is one line naming the path.
"""

from __future__ import annotations

import errno
import os
import pathlib
import secrets
import shutil
from collections.abc import Mapping

Content = str | bytes  # str is written as UTF-8


class WriteError(OSError):
    """A file that could not be written: "cannot write <path>: <reason>", one line."""

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None):
        self.path, self.reason = os.fspath(path), " ".join(reason.split())
        self.message = f"cannot write {self.path}: {self.reason}"
        super().__init__(self.message)
        self.errno = code

    def __str__(self) -> str:
        return self.message


def write_atomically(path: str | os.PathLike, content: Content) -> None:
    """Writes `content` (str as UTF-8, or bytes) to `path`, creating its folders: the whole
    file or no change."""
    write_together({path: content})


def write_together(contents: Mapping[str | os.PathLike, Content]) -> None:
    """Writes several files, all of them or none.

    Every destination folder is created and every temporary file written and flushed before
    the first rename. If a rename fails, the files renamed before it are put back as they were
    (the previous file restored, or the new one removed where there was none).

    Raises:
      WriteError: a folder or file cannot be created or renamed; no file has changed (new
        folders stay), unless the message says what could not be restored.
      ValueError: text that is not encodable as UTF-8, or one file named twice.
    """
    targets = [pathlib.Path(path) for path in contents]
    _check_distinct(targets)
    payloads = [_encoded(target, content) for target, content in zip(targets, contents.values())]
    for target in targets:
        _prepare_folder(target)
    staged: list[tuple[pathlib.Path, pathlib.Path]] = []
    try:
        for target, payload in zip(targets, payloads):
            staged.append((target, _write_temporary(target, payload)))
    except BaseException:
        for _, temporary in staged:
            _remove(temporary)
        raise
    _commit(staged)


def _check_distinct(targets: list[pathlib.Path]) -> None:
    seen = set()
    for target in targets:
        resolved = os.path.realpath(target)
        if resolved in seen:
            raise ValueError(f"cannot write {target}: the file is named more than once")
        seen.add(resolved)


def _encoded(target: pathlib.Path, content: Content) -> bytes:
    if isinstance(content, bytes):
        return content
    if not isinstance(content, str):
        raise ValueError(f"cannot write {target}: expected str or bytes, got "
                         f"{type(content).__name__}")
    try:
        return content.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"cannot write {target}: text not encodable as UTF-8 at character "
                         f"{error.start} ({error.reason})") from None


def _failure(target: pathlib.Path, doing: str, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    return WriteError(target, f"{doing} ({reason})", error.errno)


def _prepare_folder(target: pathlib.Path) -> None:
    if target.is_dir():
        raise WriteError(target, "it is a directory", errno.EISDIR)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        # The OS says only "File exists"; name the file that stands where a folder should be.
        blocker = next((p for p in (*reversed(folder.parents), folder)
                        if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise _failure(target, f"folder {folder} cannot be created", error) from None
        raise WriteError(target, f"folder {folder} cannot be created: {blocker} is a file",
                         errno.ENOTDIR) from None
    except OSError as error:
        raise _failure(target, f"folder {folder} cannot be created", error) from None


def _sibling(target: pathlib.Path, kind: str) -> pathlib.Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.{kind}")


def _write_temporary(target: pathlib.Path, payload: bytes) -> pathlib.Path:
    """The payload in a flushed temporary sibling of `target`; nothing is left on failure."""
    temporary = _sibling(target, "tmp")
    try:
        # O_EXCL: never write through a file or link someone else placed under this name.
        descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except OSError as error:
        raise _failure(target, f"cannot create a file in {target.parent}", error) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            # Flushed before the rename: after a crash the target holds old or new content,
            # never a renamed but still empty file.
            os.fsync(handle.fileno())
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, OSError):
            raise _failure(target, "cannot write the content", error) from None
        raise
    return temporary


def _commit(staged: list[tuple[pathlib.Path, pathlib.Path]]) -> None:
    """Renames each temporary file over its target; on failure undoes the earlier renames."""
    done: list[tuple[pathlib.Path, pathlib.Path | None]] = []  # (target, previous file kept)
    try:
        for position, (target, temporary) in enumerate(staged):
            # The last rename needs no copy of the previous file: if it fails, it changed nothing.
            previous = _keep_previous(target) if position < len(staged) - 1 else None
            try:
                os.replace(temporary, target)
            except OSError as error:
                _remove(previous)
                raise _failure(target, "cannot rename the new file into place", error) from None
            done.append((target, previous))
    except BaseException as error:
        for _, temporary in staged[len(done):]:
            _remove(temporary)
        stuck = _roll_back(done)
        if stuck and isinstance(error, WriteError):
            raise WriteError(error.path, f"{error.reason}; could not restore "
                             f"{', '.join(stuck)}", error.errno) from None
        raise
    for _, previous in done:
        _remove(previous)


def _keep_previous(target: pathlib.Path) -> pathlib.Path | None:
    """A second name for the file at `target` (None when there is none), to restore it."""
    if not os.path.lexists(target):
        return None
    previous = _sibling(target, "previous")
    try:
        # A hard link costs nothing and keeps the old file exactly (content, mode, owner).
        os.link(target, previous, follow_symlinks=False)
    except OSError:
        try:  # A filesystem without hard links: a copy keeps the content and the mode.
            shutil.copy2(target, previous, follow_symlinks=False)
        except OSError as error:
            _remove(previous)
            raise _failure(target, "cannot keep the previous file to restore", error) from None
    return previous


def _roll_back(done: list[tuple[pathlib.Path, pathlib.Path | None]]) -> list[str]:
    """Puts renamed targets back as they were; returns those that could not be restored."""
    stuck = []
    for target, previous in reversed(done):
        try:
            if previous is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(previous, target)
        except OSError:
            stuck.append(str(target))
    return stuck


def _remove(path: pathlib.Path | None) -> None:
    if path is not None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # Cleaning up after an earlier error: that error is the one to report.


def check_writable_directory(path: str | os.PathLike, setting: str) -> None:
    """Creates folder `path` if needed and checks that a file can be created in it, so that a
    command fails in its first second, not after minutes of setup.

    Raises:
      WriteError: one line naming `setting` (the option that gave the path) and the path.
    """
    folder = pathlib.Path(path)
    probe = folder / ".mcckd-write-check"
    try:
        _prepare_folder(probe)
        _remove(_write_temporary(probe, b""))
    except WriteError as error:
        raise WriteError(folder, f"{setting} is not a writable folder: {error.reason}",
                         error.errno) from None
