"""Grain pipelines: train batches (questions with K sampled rationales) and eval batches.

Both pipelines are `grain.MapDataset`s over step numbers, mapped to batches by a pure function
of (seed, step, process): every batch can be rebuilt from its index, so the Grain iterator
state is one integer per worker, restoring it continues with exactly the batches that would
have followed, and the batches do not depend on the number of worker processes.

Global order. Epoch e visits the questions in a permutation drawn from (seed, e); the epochs
are concatenated into one stream of question slots, and global batch i is slots
[i * G, (i + 1) * G) with G = B * process_count. Process p takes slots [p * B, (p + 1) * B) of
each global batch, so the processes' shards are disjoint and together cover the data. In a
finite run the last global batch is completed with padding slots (question_index -1, all
masks False), which contribute nothing to the losses.

Rationales. Each time question q is visited in epoch e it uses min(K, n_q) of its n_q
rationales, drawn without replacement from (seed, e, q); missing ones are masked by
rationale_mask.

Lengths. A batch is padded to the smallest bucket length that fits every sequence of its
global batch: all processes compute the same length without talking to each other (they hold
the same encoded data), so `jax.make_array_from_process_local_data` sees equal shapes, and the
train step compiles once per bucket.

Legend: B questions per process and batch, G questions per global batch, K rationales.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import grain
import numpy as np

from mcckd_jax.data import batching, packing
from mcckd_jax.data.tokenization import EncodedDataset, EncodedPrompts

_PERMUTATION_STREAM = 0  # separates the per-epoch permutation seeds from the sampling seeds
_SAMPLING_STREAM = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batch shapes, order and parallelism of the Grain pipelines."""

    batch_size: int = 8  # B: questions per batch on each process (global: B * process_count)
    num_rationales: int = 2  # K: rationales per question in a batch (fewer are masked)
    bucket_lengths: tuple[int, ...] = (128, 256, 512)  # allowed L (eval: allowed P)
    encoder_bucket_lengths: tuple[int, ...] = (64, 128, 256, 512)  # allowed E (encoder-decoder)
    max_span_tokens: int = 8  # S: answer-span width; >= TokenizationConfig.max_span_tokens
    seed: int = 0  # question order and rationale sampling
    shuffle: bool = True  # False: every epoch visits the questions in file order
    num_epochs: int | None = None  # passes over the data; None repeats forever
    num_workers: int = 0  # Grain worker processes building batches; 0 builds them in-process
    worker_buffer_size: int = 2  # batches each worker prepares ahead
    read_threads: int = 1  # threads building batches in this process when num_workers == 0
    prefetch_buffer_size: int = 4  # batches prepared ahead in this process
    # Packing (decoder-only; data/packing.py): each batch's sequences end to end in rows of a
    # bucket length; the rows per group are bucketed to 2^k or 3 x 2^(k-1).
    packing: bool = False
    pack_groups: int = 1  # groups per process (mcckd-train: this process's data-parallel devices)
    shared_prompt: bool = False  # packed: a question's views share one copy of its prompt

    def __post_init__(self):
        for name in ("batch_size", "num_rationales", "max_span_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.bucket_lengths or not self.encoder_bucket_lengths:
            raise ValueError("bucket_lengths and encoder_bucket_lengths must not be empty")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")


@functools.lru_cache(maxsize=8)  # thread-safe; nearby batches share their few epochs
def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the questions."""
    return np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(size)


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")


class TrainBatches:
    """step -> this process's train batch; picklable, so Grain workers can run it."""

    def __init__(self, data: EncodedDataset, config: PipelineConfig, process_index: int,
                 process_count: int):
        _check_process(process_index, process_count)
        if data.num_questions == 0:
            raise ValueError("the encoded dataset has no questions")
        if config.packing and data.layout != "decoder_only":
            raise ValueError("data.pipeline.packing is for decoder-only students; T5 keeps its "
                             "layout")
        if config.shared_prompt and not config.packing:
            raise ValueError("data.pipeline.shared_prompt needs data.pipeline.packing=true")
        if config.shared_prompt and (too_long := _longest_shared(data, config.num_rationales)
                                     ) > max(config.bucket_lengths):
            raise ValueError(f"a question's prompt and {config.num_rationales} rationales take "
                             f"{too_long} positions, more than the largest bucket "
                             f"{max(config.bucket_lengths)}: raise bucket_lengths or turn "
                             "shared_prompt off")
        if config.packing and config.batch_size % config.pack_groups:
            raise ValueError(f"data.pipeline.batch_size ({config.batch_size}) does not split "
                             f"into pack_groups={config.pack_groups}")
        spans = np.diff(data.span_offsets)
        if spans.max() > config.max_span_tokens:
            raise ValueError(f"answer spans of up to {spans.max()} tokens do not fit "
                             f"max_span_tokens={config.max_span_tokens}")
        self.data, self.config = data, config
        self.process_index, self.process_count = process_index, process_count
        self.lengths = data.sequence_lengths()
        batching.bucket_for(int(self.lengths.max()), config.bucket_lengths)
        self.global_batch = config.batch_size * process_count

    @property
    def num_steps(self) -> int:
        """Batches per process in the run; sys.maxsize when it repeats forever."""
        if self.config.num_epochs is None:
            return sys.maxsize
        return math.ceil(self.config.num_epochs * self.data.num_questions / self.global_batch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.config.shuffle:
            return np.arange(self.data.num_questions)
        return _epoch_permutation(self.config.seed, epoch, self.data.num_questions)

    def _slot(self, slot: int) -> tuple[int, int]:
        """(epoch, question) of a slot of the stream; question -1 past the last epoch."""
        epoch, position = divmod(slot, self.data.num_questions)
        if self.config.num_epochs is not None and epoch >= self.config.num_epochs:
            return epoch, -1
        return epoch, int(self._permutation(epoch)[position])

    def _sample(self, epoch: int, question: int) -> np.ndarray:
        first, last = self.data.question_rationales[question:question + 2]
        rng = np.random.default_rng([self.config.seed, _SAMPLING_STREAM, epoch, question])
        count = min(self.config.num_rationales, last - first)
        return first + rng.choice(last - first, size=count, replace=False)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        slots = [self._slot(step * self.global_batch + i) for i in range(self.global_batch)]
        choices = [self._sample(e, q) if q >= 0 else np.zeros(0, np.int64) for e, q in slots]
        needed = max((int(self.lengths[c].max()) for c in choices if len(c)), default=1)
        length = batching.bucket_for(needed, self.config.bucket_lengths)
        encoder_length = None
        if self.data.layout == "encoder_decoder":
            prompt_lengths = np.diff(self.data.prompt_offsets)
            encoder_length = batching.bucket_for(
                max((int(prompt_lengths[q]) for _, q in slots if q >= 0), default=1),
                self.config.encoder_bucket_lengths)
        mine = slice(self.process_index * self.config.batch_size,
                     (self.process_index + 1) * self.config.batch_size)
        if self.config.packing:
            return self._packed(slots, choices, mine)
        return batching.build_train_batch(
            self.data, [q for _, q in slots[mine]], choices[mine],
            num_rationales=self.config.num_rationales, length=length,
            span_length=self.config.max_span_tokens, encoder_length=encoder_length)


    def _packed(self, slots, choices, mine: slice) -> dict[str, np.ndarray]:
        """This process's share packed into the fewest positions: the row length is the
        bucket length (at least the longest sequence) whose bucketed row count makes the
        smallest R x L. Every process sizes its rows for the fullest process (the same R and L
        everywhere)."""
        config, size = self.config, self.config.batch_size
        shares = [([q for _, q in slots[p * size:(p + 1) * size]], choices[p * size:(p + 1) * size])
                  for p in range(self.process_count)]
        if config.shared_prompt:
            longest = max((packing.shared_length(self.data, q, c)
                           for (_, q), c in zip(slots, choices) if len(c)), default=1)
        else:
            longest = max((int(self.lengths[c].max()) for c in choices if len(c)), default=1)
        best = None
        for row_length in sorted(config.bucket_lengths):
            if row_length < longest:
                continue
            per_group = max(packing.rows_needed(self.data, questions, chosen,
                                                row_length=row_length,
                                                groups=config.pack_groups,
                                                shared_prompt=config.shared_prompt)
                            for questions, chosen in shares) // config.pack_groups
            rows = config.pack_groups * row_bucket(per_group)
            if best is None or rows * row_length < best[0] * best[1]:
                best = (rows, row_length)
        rows, row_length = best
        return packing.build_packed_batch(
            self.data, [q for _, q in slots[mine]], choices[mine],
            num_rationales=config.num_rationales, row_length=row_length, num_rows=rows,
            span_length=config.max_span_tokens, groups=config.pack_groups,
            shared_prompt=config.shared_prompt)


def _longest_shared(data: EncodedDataset, num_rationales: int) -> int:
    """The most positions a question with a shared prompt can take: its K longest views."""
    rationale_lengths = np.diff(data.rationale_offsets)
    prompt_lengths = np.diff(data.prompt_offsets)
    return max(int(prompt_lengths[q]) - 1 + int(np.sort(rationale_lengths[
        data.question_rationales[q]:data.question_rationales[q + 1]])[::-1][:num_rationales].sum())
        for q in range(data.num_questions))


def row_bucket(rows: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 x 2^(k-1)) that is >= rows."""
    bucket = 1
    while True:
        if bucket >= rows:
            return bucket
        if bucket >= 2 and 3 * bucket // 2 >= rows:
            return 3 * bucket // 2
        bucket *= 2


class EvalBatches:
    """step -> this process's eval batch (questions in file order, one pass)."""

    def __init__(self, prompts: EncodedPrompts, config: PipelineConfig, process_index: int,
                 process_count: int):
        _check_process(process_index, process_count)
        self.prompts, self.config = prompts, config
        self.process_index, self.process_count = process_index, process_count
        self.global_batch = config.batch_size * process_count
        self.buckets = (config.encoder_bucket_lengths if prompts.layout == "encoder_decoder"
                        else config.bucket_lengths)
        batching.bucket_for(int(np.diff(prompts.prompt_offsets).max(initial=1)), self.buckets)

    @property
    def num_steps(self) -> int:
        return math.ceil(self.prompts.num_questions / self.global_batch)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        first = step * self.global_batch
        slots = [q if q < self.prompts.num_questions else -1
                 for q in range(first, first + self.global_batch)]
        lengths = np.diff(self.prompts.prompt_offsets)
        length = batching.bucket_for(max((int(lengths[q]) for q in slots if q >= 0), default=1),
                                     self.buckets)
        mine = slots[self.process_index * self.config.batch_size:
                     (self.process_index + 1) * self.config.batch_size]
        return batching.build_eval_batch(self.prompts, mine, length=length)


def _allow_worker_processes() -> None:
    """Works around google/grain#1355 (fixed upstream by #1362, after grain 0.2.18).

    With JAX loaded, grain 0.2.18 reads the absl flag
    --grain_enable_multiprocess_worker_profiling when it starts worker processes, which raises
    UnparsedFlagAccessError in programs that do not parse absl flags (anything not started by
    absl.app). Marking that one flag as given keeps its default value (False) and leaves every
    other flag alone.
    """
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = 1


def _serve(batches: TrainBatches | EvalBatches, config: PipelineConfig) -> grain.IterDataset:
    dataset = grain.MapDataset.range(batches.num_steps).map(batches)
    if config.num_workers > 0:
        _allow_worker_processes()
        # Batches are built in worker processes; this process only receives them.
        return dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
                                       ).mp_prefetch(grain.MultiprocessingOptions(
                                           num_workers=config.num_workers,
                                           per_worker_buffer_size=config.worker_buffer_size))
    return dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Only to ask which process this is; batches are numpy.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def train_dataset(data: EncodedDataset, config: PipelineConfig, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """This process's train batches as a Grain IterDataset (module docstring).

    `iter(dataset)` gives an iterator with get_state()/set_state(); save its state with the
    train state (grain.checkpoint.CheckpointSave inside ocp.args.Composite). process_index and
    process_count default to jax.process_index() and jax.process_count().
    """
    return _serve(TrainBatches(data, config, *_process(process_index, process_count)), config)


def eval_dataset(prompts: EncodedPrompts, config: PipelineConfig, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """This process's eval batches (prompts only, every question once, in order)."""
    return _serve(EvalBatches(prompts, config, *_process(process_index, process_count)), config)
