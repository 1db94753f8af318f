"""A local teacher: a checkpoint that `load_pretrained` reads, sampled with the project's
KV-cache decoder (`eval.decoding`), data-parallel over the devices and processes of a mesh.

Reproducibility. Sample `i` of question `q` is drawn with its own key,
jax.random.key(sample_seed(params, q, i)): its token n with fold_in(that key, n), row by row
(`decoding.generate(row_keys=...)`). Its prompt is left-padded to a bucket, with RoPE positions
and attention masks that ignore the padding. So which requests share its batch, the batch size,
the mesh and the process count change nothing but the floating-point rounding of batched
matrix products (tests/test_teacher_local.py checks that the tokens stay identical on a tiny
model).

Batching. The requests are put in a canonical order (by question key, then sample index),
grouped by prompt bucket (stable, so still canonical inside a bucket) and cut into global
batches of batch_size x processes rows; a short last batch is filled with copies of its first
row (they finish when it does, and are dropped). Every process decodes its own batch_size rows
of each global batch, and the generated tokens are gathered to all processes.

Callbacks. `on_sample` is called on every process, with the same samples in the same order
(after each global batch, in canonical order): every process sees all samples, so that what
the run decides from them (adaptive sampling asks for more samples) is the same everywhere, as
the collectives of the next `generate` require. Only process 0 should write the cache.

Legend: B rows per process and batch, G = B x processes rows of a global batch, L prompt
bucket, N new tokens (params.max_tokens), K key data words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mcckd_jax import sharding
from mcckd_jax.data import batching, tokenization
from mcckd_jax.eval import decoding
from mcckd_jax.models import hf_import, pretrained
from mcckd_jax.teacher.base import OnSample, Sample, SampleRequest, SamplingParams, sample_seed

log = logging.getLogger(__name__)

# Beside the weights, what a checkpoint directory holds that changes the samples.
_METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class _Encoded:
    """A request with its chat-templated prompt token ids."""

    request: SampleRequest
    prompt_ids: tuple[int, ...]


class LocalTeacher:
    """Samples rationales from a local checkpoint (safetensors/bin directory, or GGUF)."""

    def __init__(self, checkpoint: str | os.PathLike, *, gguf_file: str | None = None,
                 mesh: jax.sharding.Mesh, batch_size: int = 16,
                 prompt_buckets: Sequence[int] = (64, 128, 256, 512, 1024),
                 tokenizer: Any = None):
        """Loads the checkpoint sharded on `mesh` and its tokenizer (or `tokenizer`).

        Args:
          batch_size: B, rows per process of a global batch (batch_size x processes must
            split over the mesh's data-parallel devices).
          prompt_buckets: allowed prompt widths L (one compilation each); a longer prompt is
            an error, never truncated.
        """
        if batch_size < 1 or not prompt_buckets:
            raise ValueError("batch_size must be >= 1 and prompt_buckets not empty")
        sharding.check_batch_divides(
            batch_size * jax.process_count(), mesh,
            what=f"the teacher batch size ({batch_size} per process x {jax.process_count()} "
                 "processes)")
        self._mesh, self._batch_size = mesh, batch_size
        self._buckets = tuple(sorted(prompt_buckets))
        self._tokenizer = (tokenization.load_tokenizer(checkpoint, gguf_file)
                           if tokenizer is None else tokenizer)
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(f"{checkpoint}: the tokenizer has no chat template (a local teacher "
                             "renders chat messages with it; use an instruct/chat checkpoint)")
        hf_config = hf_import.read_hf_config(checkpoint, gguf_file)
        self._eos_ids = eos_ids(self._tokenizer, hf_config, _generation_config(checkpoint, gguf_file))
        self._pad_id = tokenization.pad_id(self._tokenizer)
        where = os.path.join(checkpoint, gguf_file) if gguf_file else os.fspath(checkpoint)
        self._model_id = (f"{where}@sha256:"
                          f"{checkpoint_digest(checkpoint, gguf_file, self._tokenizer)}")
        self._model = pretrained.load_pretrained(checkpoint, mesh=mesh, gguf_file=gguf_file)

    @property
    def model_id(self) -> str:
        """The checkpoint path and a digest of its content (`checkpoint_digest`)."""
        return self._model_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sample (`eos_ids`)."""
        return self._eos_ids

    def encode(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Prompt token ids: the messages through the chat template, with the generation
        prompt (the template writes the special tokens it wants, BOS included)."""
        text = self._tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages], tokenize=False,
            add_generation_prompt=True)
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[SampleRequest], params: SamplingParams,
                 on_sample: OnSample) -> None:
        """Samples every request; `on_sample` runs on every process (module docstring). Every
        process must call it with the same requests."""
        encoded = [_Encoded(r, tuple(self.encode(r.messages))) for r in requests]
        for item in encoded:
            if len(item.prompt_ids) > self._buckets[-1]:
                raise ValueError(
                    f"question {item.request.question_key}: its prompt has "
                    f"{len(item.prompt_ids)} tokens, more than the largest prompt bucket "
                    f"{self._buckets[-1]}")
        if jax.process_count() > 1:
            _check_same_requests(encoded)
        rows = self._batch_size * jax.process_count()
        for bucket, batch in plan_batches(encoded, rows, self._buckets):
            started = time.perf_counter()
            tokens_GN = self._decode(batch, bucket, params)
            samples = [self._sample(item, tokens_N) for item, tokens_N in zip(batch, tokens_GN)]
            log.info("%d samples (prompt bucket %d) in %.1f s, %d new tokens", len(batch),
                     bucket, time.perf_counter() - started,
                     sum(s.completion_tokens for s in samples))
            for item, sample in zip(batch, samples):
                on_sample(item.request, sample)

    def _decode(self, batch: list[_Encoded], bucket: int, params: SamplingParams) -> np.ndarray:
        """Tokens [len(batch), N] of one global batch, on every process."""
        rows, process = self._batch_size * jax.process_count(), jax.process_index()
        # Filler rows copy the first row: they stop with it, never prolonging the loop.
        filled = batch + [batch[0]] * (rows - len(batch))
        mine = range(process * self._batch_size, (process + 1) * self._batch_size)
        prompt_BL, mask_BL = left_padded([filled[i].prompt_ids for i in mine], bucket,
                                         self._pad_id)
        seeds = [sample_seed(params, filled[i].request.question_key,
                             filled[i].request.sample_index) for i in mine]
        key_data_BK = np.stack([np.asarray(jax.random.key_data(jax.random.key(s)))
                                for s in seeds])
        row_ids_B = np.asarray(list(mine), np.int32)
        prompt_GL, mask_GL, key_data_GK, row_ids_G = sharding.global_batch(
            (prompt_BL, mask_BL, key_data_BK, row_ids_B), self._mesh)
        sampling = decoding.SamplingConfig(temperature=params.temperature, top_p=params.top_p,
                                           max_new_tokens=params.max_tokens)
        with sharding.activate(self._mesh):
            row_keys_G = _wrap_key_data(key_data_GK) if params.temperature > 0 else None
            tokens_GN = decoding.generate(self._model, prompt_GL, mask_GL, sampling=sampling,
                                          eos_token_ids=self._eos_ids, pad_token_id=self._pad_id,
                                          row_keys=row_keys_G)
        # The rows of the global array, whatever order the mesh gives the processes' rows in.
        gathered_GN = np.asarray(multihost_utils.process_allgather(tokens_GN, tiled=True))
        order_G = np.asarray(multihost_utils.process_allgather(row_ids_G, tiled=True))
        by_row = dict(zip(order_G.tolist(), gathered_GN))
        return np.stack([by_row[i] for i in range(len(batch))])

    def _sample(self, item: _Encoded, tokens_N: np.ndarray) -> Sample:
        """The text up to the first EOS (special tokens skipped) and its counts; the EOS counts
        as a completion token, as the API servers count it."""
        ends = np.flatnonzero(np.isin(tokens_N, self._eos_ids))
        stopped = ends.size > 0
        kept = tokens_N[:ends[0]] if stopped else tokens_N
        return Sample(text=self._tokenizer.decode(kept.tolist(), skip_special_tokens=True),
                      prompt_tokens=len(item.prompt_ids),
                      completion_tokens=int(ends[0]) + 1 if stopped else len(tokens_N),
                      finish_reason="stop" if stopped else "length")


_wrap_key_data = jax.jit(jax.random.wrap_key_data)  # jitted: its input may span processes


def plan_batches(encoded: Sequence[_Encoded], rows: int, buckets: Sequence[int]
                 ) -> list[tuple[int, list[_Encoded]]]:
    """(prompt bucket, at most `rows` requests) of every global batch: canonical order (question
    key, sample index), grouped by bucket, smallest bucket first."""
    canonical = sorted(encoded, key=lambda e: (e.request.question_key, e.request.sample_index))
    by_bucket: dict[int, list[_Encoded]] = {}
    for item in canonical:
        by_bucket.setdefault(batching.bucket_for(len(item.prompt_ids), buckets), []).append(item)
    return [(bucket, items[start:start + rows])
            for bucket, items in sorted(by_bucket.items())
            for start in range(0, len(items), rows)]


def left_padded(prompts: Sequence[Sequence[int]], width: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts [B, L] left-padded with pad_id to `width`, and their mask [B, L] (1: real)."""
    prompt_BL = np.full((len(prompts), width), pad_id, np.int32)
    mask_BL = np.zeros((len(prompts), width), np.int32)
    for row, ids in enumerate(prompts):
        prompt_BL[row, width - len(ids):] = ids
        mask_BL[row, width - len(ids):] = 1
    return prompt_BL, mask_BL


def eos_ids(tokenizer: Any, hf_config: dict, generation_config: dict) -> tuple[int, ...]:
    """Every id that ends a sample: the tokenizer's EOS and the eos_token_id(s) of config.json
    and generation_config.json (chat models often list their end-of-turn token there)."""
    found: set[int] = set()
    for value in (tokenizer.eos_token_id, hf_config.get("eos_token_id"),
                  generation_config.get("eos_token_id")):
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
    if not found:
        raise ValueError("the teacher checkpoint names no EOS token (tokenizer, config.json or "
                         "generation_config.json)")
    return tuple(sorted(int(i) for i in found))


def _generation_config(checkpoint: str | os.PathLike, gguf_file: str | None) -> dict:
    """generation_config.json beside the weights; none for a GGUF file (it holds all)."""
    path = pathlib.Path(checkpoint)
    if gguf_file is not None or path.suffix == ".gguf":
        return {}
    file = (path if path.is_dir() else path.parent) / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def checkpoint_files(checkpoint: str | os.PathLike, gguf_file: str | None = None
                     ) -> list[pathlib.Path]:
    """The files whose content makes a teacher's samples: the GGUF file alone (it holds
    weights, config and tokenizer); else the weight files that `load_pretrained` reads (an
    index and its shards, model.safetensors or pytorch_model.bin) and the config, generation
    config and tokenizer files (`_METADATA_FILES`) beside them."""
    path = pathlib.Path(checkpoint)
    if gguf_file is not None or path.suffix == ".gguf":
        return [path / gguf_file if gguf_file else path]
    if path.is_file():
        return [path] + [f for f in map(path.parent.joinpath, _METADATA_FILES) if f.is_file()]
    weights = []
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            index = json.loads((path / name).read_text())
            weights = [path / name] + [path / f for f in dict.fromkeys(index["weight_map"].values())]
            break
    else:
        weights = [f for f in (path / "model.safetensors", path / "pytorch_model.bin")
                   if f.is_file()][:1]
    if not weights:
        raise FileNotFoundError(f"{path}: no weights to load")
    return weights + [f for f in map(path.joinpath, _METADATA_FILES) if f.is_file()]


def checkpoint_digest(checkpoint: str | os.PathLike, gguf_file: str | None = None,
                      tokenizer: Any = None) -> str:
    """The first 16 hex digits of a SHA-256 over the name and content of every
    `checkpoint_files` file, and the chat template of `tokenizer` (which may not come from
    the checkpoint). Reads every byte: about 1 s per GB."""
    digest = hashlib.sha256()
    for file in checkpoint_files(checkpoint, gguf_file):
        with open(file, "rb") as handle:
            content = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{file.name}\0{content}\0".encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _check_same_requests(encoded: Sequence[_Encoded]) -> None:
    """Raises when the processes were given different requests (their batches would not
    match, and the collectives would hang or mix samples)."""
    digest = hashlib.sha256()
    for item in sorted(encoded, key=lambda e: (e.request.question_key, e.request.sample_index)):
        digest.update(repr((item.request.question_key, item.request.sample_index,
                            item.prompt_ids)).encode())
    mine = np.frombuffer(digest.digest()[:8], np.uint32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    if not (everyone == mine).all():
        raise ValueError("the processes were given different teacher requests; every process "
                         "must call generate with the same ones")
