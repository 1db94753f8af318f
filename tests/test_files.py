"""files: all-or-nothing writes, umask-following modes, rollback, one-line errors."""

import errno
import os
import stat

import pytest

from mcckd_jax import files
from mcckd_jax.files import WriteError, write_atomically, write_together


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores the previous one afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_and_replaced_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    target = tmp_path / "new" / "deeper" / "file.txt"
    write_atomically(target, "första\n")
    assert target.read_bytes() == "första\n".encode("utf-8")
    assert _mode(target) == 0o666 & ~mask
    target.write_text("x")
    target.chmod(0o600)
    write_atomically(target, b"\x00\xff bytes")
    assert target.read_bytes() == b"\x00\xff bytes"
    assert _mode(target) == 0o666 & ~mask  # a fresh file, like any other the process makes
    assert _names(target.parent) == ["file.txt"]


def _fail_fsync(monkeypatch):
    def fsync(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", fsync)


def _fail_replace(monkeypatch):
    def replace(source, destination):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "replace", replace)


@pytest.mark.parametrize("content,break_step,error,message", [
    ("text with a lone surrogate \ud800", None, ValueError, "not encodable as UTF-8"),
    ("new content", _fail_fsync, OSError, "No space left on device"),
    ("new content", _fail_replace, OSError, "Invalid cross-device link"),
])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(
        tmp_path, monkeypatch, content, break_step, error, message):
    target = tmp_path / "file.txt"
    target.write_text("old content")
    if break_step is not None:
        break_step(monkeypatch)
    with pytest.raises(error, match=message) as raised:
        write_atomically(target, content)
    assert str(target) in str(raised.value) and "\n" not in str(raised.value)
    assert target.read_text() == "old content"
    assert _names(tmp_path) == ["file.txt"]


def test_write_together_writes_every_file(tmp_path):
    targets = {tmp_path / "a" / "data.jsonl": "{}\n", tmp_path / "b" / "report.json": b"[]"}
    write_together(targets)
    assert (tmp_path / "a" / "data.jsonl").read_text() == "{}\n"
    assert (tmp_path / "b" / "report.json").read_bytes() == b"[]"
    assert _names(tmp_path / "a") == ["data.jsonl"] and _names(tmp_path / "b") == ["report.json"]


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard_links", "copies"])
def test_write_together_rolls_back_when_a_later_rename_fails(tmp_path, monkeypatch, hard_links):
    first, second, third = tmp_path / "first.txt", tmp_path / "second.txt", tmp_path / "third.txt"
    first.write_text("old first")
    first.chmod(0o640)
    third.write_text("old third")  # second.txt does not exist before
    if not hard_links:
        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(files.os, "link", no_links)
    real_replace, renamed = os.replace, []

    def replace(source, destination):
        if os.fspath(destination) == os.fspath(third):
            raise OSError(errno.EIO, "Input/output error")
        renamed.append(os.fspath(destination))
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match=r"third.txt.*Input/output error") as raised:
        write_together({first: "new first", second: "new second", third: "new third"})
    assert "\n" not in str(raised.value)
    # Both earlier renames happened, then were undone.
    assert renamed[:2] == [os.fspath(first), os.fspath(second)]
    assert first.read_text() == "old first" and _mode(first) == 0o640
    assert not second.exists()
    assert third.read_text() == "old third"
    assert _names(tmp_path) == ["first.txt", "third.txt"]


def test_a_failed_rollback_is_named_in_the_error(tmp_path, monkeypatch):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("old first")
    real_replace = os.replace

    def replace(source, destination):
        # The second rename fails, and so does putting the first file back.
        if os.fspath(destination) == os.fspath(second) or ".previous" in os.fspath(source):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(WriteError) as raised:
        write_together({first: "new first", second: "new second"})
    assert str(raised.value) == (f"cannot write {second}: cannot rename the new file into place "
                                 f"(Input/output error); could not restore {first}")
    assert first.read_text() == "new first"  # what the message warns about


def test_write_together_stages_every_file_before_touching_any(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("old")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(OSError, match="blocker is a file"):
        write_together({good: "new", tmp_path / "blocker" / "report.json": "{}"})
    assert good.read_text() == "old"
    assert _names(tmp_path) == ["blocker", "good.txt"]


def test_write_together_rejects_one_file_named_twice(tmp_path):
    with pytest.raises(ValueError, match="same.txt.*more than once"):
        write_together({tmp_path / "same.txt": "a", tmp_path / "x" / ".." / "same.txt": "b"})
    assert _names(tmp_path) == []


def _deny_file_creation(monkeypatch):
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", open_)


@pytest.mark.parametrize("relative,setup,message", [
    ("blocker/report.json", None, r"folder .*blocker cannot be created: .*blocker is a file"),
    ("blocker/deeper/report.json", None,
     r"folder .*deeper cannot be created: .*blocker is a file"),
    ("folder", None, r"folder: it is a directory"),
    ("report.json", _deny_file_creation, r"report.json: cannot create a file in .*Permission"),
])
def test_errors_are_one_line_and_name_the_path(tmp_path, monkeypatch, relative, setup, message):
    (tmp_path / "blocker").write_text("x")
    (tmp_path / "folder").mkdir()
    if setup is not None:
        setup(monkeypatch)
    target = tmp_path / relative
    with pytest.raises(WriteError, match=message) as raised:
        write_atomically(target, "content")
    text = str(raised.value)
    assert text.startswith(f"cannot write {target}: ") and "\n" not in text
    assert "[Errno" not in text and raised.value.path == str(target)
    assert (tmp_path / "blocker").read_text() == "x" and _names(tmp_path / "folder") == []
    assert _names(tmp_path) == ["blocker", "folder"]
