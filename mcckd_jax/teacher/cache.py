"""The durable sample cache: every finished teacher sample, one JSON line, fsynced before it counts.

The cache is one append-only file, `<cache dir>/samples.jsonl`. `SampleCache.append` writes a
line and flushes and fsyncs it before it returns: a sample counts as done only then, so a
killed run loses at most the samples in flight, and a resumed run asks the teacher for exactly
the missing ones. Loading tolerates a torn last line (a kill -9 or a crash in the middle of a
write leaves a tail without its newline): the tail is ignored and cut off, so the next append
starts on a fresh line. A complete line that does not parse is damage, not a torn write, and
is refused with a one-line `CacheError` naming the file and the line. One process at a time
may hold a cache folder (an exclusive lock on the file).

Keys (`cache_key`): SHA-256 of a canonical JSON of everything that determines a sample: the
teacher's model id, the chat messages (the prompt template applied), every field of the
`SamplingParams` (the base seed included), the question key and the sample index.

The question key is part of the key. Each sample's seed derives from (seed, question key,
sample index) (`base.sample_seed`), so the question key determines the sample as much as the
prompt does: a key without it would map two requests the teacher answers with different seeds
to one entry, and which of them lands first (concurrency) would decide what both questions get.
With it, two identical questions in one file get their own, independent samples, as their
seeds say (mcckd-prepare merges repeated questions, which then hold twice as many distinct
rationales rather than the same ones twice). The price: a question whose key changes (its
file renamed, records inserted before it, when the key is `Record.uid`) is sampled afresh.

How a teacher groups sample indices into requests (`teacher.api`) is not in the key: after a
change of grouping, cached samples are still samples of the same model, prompt, sampling and
index, and are reused.

The cache holds samples and request identities only; never an API key or any header.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from mcckd_jax.data import records
from mcckd_jax.files import WriteError
from mcckd_jax.teacher.base import Sample, SampleRequest, SamplingParams

CACHE_FILE = "samples.jsonl"
KEY_SCHEME = 1  # hashed with the key's contents: a new scheme never collides with old keys

logger = logging.getLogger(__name__)

_LINE_FIELDS = {"key": str, "question_key": str, "sample_index": int, "text": str,
                "prompt_tokens": int, "completion_tokens": int, "finish_reason": str}


class CacheError(ValueError):
    """A damaged or busy cache; `str(error)` is one line naming the file (and line, field)."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None,
                 message: str):
        self.path, self.line, self.field = str(path), line, field
        self.message = " ".join(str(message).split())
        super().__init__(records.located(self.path, None if line is None else f"line {line}",
                                         field, self.message))


def cache_key(model_id: str, messages: Sequence[tuple[str, str]], params: SamplingParams,
              question_key: str, sample_index: int) -> str:
    """The 64-hex-digit SHA-256 key of one sample (what enters it: the module docstring)."""
    content = {"scheme": KEY_SCHEME, "model_id": model_id,
               "messages": [[role, text] for role, text in messages],
               "sampling": dataclasses.asdict(params), "question_key": question_key,
               "sample_index": sample_index}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def request_key(model_id: str, request: SampleRequest, params: SamplingParams) -> str:
    """`cache_key` of a request."""
    return cache_key(model_id, request.messages, params, request.question_key,
                     request.sample_index)


class SampleCache:
    """Samples by key, loaded from the cache folder and appended to it durably.

    Use as a context manager (or call `close`): the open file holds the folder's lock.

    With `read_only` (the processes of a multi-process local teacher other than the writer)
    the file's complete lines are read without the lock and without cutting a torn tail, and
    `append` keeps samples in memory only: every process sees the same samples, one writes.
    """

    def __init__(self, directory: str | os.PathLike, *, read_only: bool = False):
        self.path = pathlib.Path(directory) / CACHE_FILE
        self.read_only = read_only
        self._samples: dict[str, Sample] = {}
        if read_only:
            self._descriptor = -1
            data = self.path.read_bytes() if self.path.exists() else b""
            self._size = data.rfind(b"\n") + 1
            self._load(data[:self._size])
            return
        self._descriptor = _open_locked(self.path)
        try:
            data = _read_all(self._descriptor)
            self._size = self._cut_torn_tail(data)
            self._load(data[:self._size])
        except BaseException:
            os.close(self._descriptor)
            raise

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, key: str) -> bool:
        return key in self._samples

    def get(self, key: str) -> Sample | None:
        """The sample stored under `key`, or None."""
        return self._samples.get(key)

    def append(self, key: str, request: SampleRequest, sample: Sample) -> None:
        """Stores a sample: one line written, flushed and fsynced before this returns.

        A key already stored keeps its first sample (the one that counted as done).

        Raises:
          WriteError: the line could not be written; the file is cut back to its last
            complete line, so that a later append does not follow a torn one.
        """
        if key in self._samples:
            return
        if self.read_only:
            self._samples[key] = sample
            return
        if self._descriptor < 0:
            raise ValueError(f"{self.path}: the cache is closed")
        record = {"key": key, "question_key": request.question_key,
                  "sample_index": request.sample_index, "text": sample.text,
                  "prompt_tokens": sample.prompt_tokens,
                  "completion_tokens": sample.completion_tokens,
                  "finish_reason": sample.finish_reason}
        line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
        try:
            _write_all(self._descriptor, line)
            os.fsync(self._descriptor)
        except OSError as error:
            self._cut_back()
            raise WriteError(self.path, f"cannot append a sample ({error.strerror or error})",
                             error.errno) from None
        self._size += len(line)
        self._samples[key] = sample

    def close(self) -> None:
        """Releases the file and its lock (appends are durable already)."""
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def __enter__(self) -> SampleCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _cut_torn_tail(self, data: bytes) -> int:
        """The size of the complete lines; a torn tail is cut off the file."""
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            logger.warning("%s: ignored a torn last line (%d bytes without a newline, a write "
                           "interrupted by a kill or a crash)", self.path, len(data) - complete)
            os.ftruncate(self._descriptor, complete)
            os.fsync(self._descriptor)
        return complete

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._descriptor, self._size)
        except OSError:
            pass  # Reporting the write error matters more; the next load cuts a torn tail.

    def _load(self, data: bytes) -> None:
        for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            key, sample = _parse_line(raw, self.path, number)
            self._samples.setdefault(key, sample)


def _open_locked(path: pathlib.Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as error:
        raise CacheError(path, None, None, f"cannot open the cache "
                         f"({error.strerror or error})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise CacheError(path, None, None, "in use by another process (one run per cache "
                         "folder at a time)") from None
    if not existed:
        _sync_folder(path.parent)  # the new file's name is durable, not only its lines
    return descriptor


def _sync_folder(folder: pathlib.Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Some filesystems cannot open folders; the lines are fsynced regardless.
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # As above: only the file name's durability is lost, never a sample line.
    finally:
        os.close(descriptor)


def _read_all(descriptor: int) -> bytes:
    os.lseek(descriptor, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(descriptor, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(descriptor: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def _parse_line(raw: bytes, path: pathlib.Path, number: int) -> tuple[str, Sample]:
    try:
        record: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        what = (f"not valid UTF-8 at byte {error.start + 1}" if isinstance(
            error, UnicodeDecodeError) else f"malformed JSON at column {error.colno}: {error.msg}")
        raise CacheError(path, number, None, f"{what}; the cache is damaged (only a torn last "
                         "line is repaired): move the file aside to start afresh") from None
    if not isinstance(record, dict):
        raise CacheError(path, number, None, f"expected an object, got {type(record).__name__}")
    for field, kind in _LINE_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if value is None else f"got {type(value).__name__}"
            raise CacheError(path, number, field, f"expected {kind.__name__}, {got}")
    sample = Sample(text=record["text"], prompt_tokens=record["prompt_tokens"],
                    completion_tokens=record["completion_tokens"],
                    finish_reason=record["finish_reason"])
    return record["key"], sample
