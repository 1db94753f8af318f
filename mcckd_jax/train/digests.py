"""Content digests of a checkpoint: a SHA-256 of every file of every saved item, written into
the checkpoint before Orbax commits it, and checked before anything is restored from it.

A step directory holds one folder per item (params, model_state, optimizer, data) and Orbax's
own bookkeeping at its top (_CHECKPOINT_METADATA, commit_success.txt), which Orbax rewrites
while it commits and which holds no training state; the digests cover the item folders.

`seal` runs in Orbax's post-finalization callback, after every process's files are written
and before the temporary directory is renamed to the step, so a committed checkpoint always
carries its digests. A step directory without them was not written by this code (or by an
older version of it) and counts as unverified.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib

from mcckd_jax import files

DIGESTS_FILE = "mcckd_digests.json"
_FORMAT = 1
_CHUNK_BYTES = 8 << 20


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)  # hashlib releases the GIL: files hash in parallel
    return digest.hexdigest()


def _item_files(step_dir: pathlib.Path) -> list[str]:
    """Relative paths of the files inside the item folders, sorted."""
    return sorted(str(path.relative_to(step_dir)) for item in step_dir.iterdir() if item.is_dir()
                  for path in item.rglob("*") if path.is_file())


def compute(step_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{item: {path relative to the step directory: sha256 hex}} of every item file."""
    step_dir = pathlib.Path(step_dir)
    names = _item_files(step_dir)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = pool.map(lambda name: _sha256(step_dir / name), names)
        by_item: dict[str, dict[str, str]] = {}
        for name, sha in zip(names, hashes):
            by_item.setdefault(name.split(os.sep, 1)[0], {})[name] = sha
    return by_item


def seal(step_dir: str | os.PathLike) -> None:
    """Writes the digests of `step_dir`'s items into it (atomically)."""
    step_dir = pathlib.Path(step_dir)
    record = {"format": _FORMAT, "algorithm": "sha256", "items": compute(step_dir)}
    files.write_atomically(step_dir / DIGESTS_FILE, json.dumps(record, indent=1) + "\n")


def problem(step_dir: str | os.PathLike) -> str | None:
    """Why `step_dir` fails verification (one line), or None when every item file matches its
    digest and no item file is missing or unrecorded."""
    step_dir = pathlib.Path(step_dir)
    try:
        record = json.loads((step_dir / DIGESTS_FILE).read_text())
        recorded: dict[str, dict[str, str]] = record["items"]
        if record.get("format") != _FORMAT or not isinstance(recorded, dict):
            return f"{DIGESTS_FILE} has an unknown format"
    except FileNotFoundError:
        return (f"it has no {DIGESTS_FILE} (written by an older version, or its save was "
                "interrupted), so it cannot be verified")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{DIGESTS_FILE} is unreadable ({type(error).__name__}: {error})"
    actual = compute(step_dir)
    for item in sorted(set(recorded) | set(actual)):
        expected, found = recorded.get(item, {}), actual.get(item, {})
        for name in sorted(set(expected) | set(found)):
            if name not in found:
                return f"{name} is missing"
            if name not in expected:
                return f"{name} is not in its {DIGESTS_FILE}"
            if found[name] != expected[name]:
                return f"{name} differs from its digest"
    return None
