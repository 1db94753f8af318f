"""Evaluating a student on question files: batched decoding over the mesh, then scoring.

Every process reads the same files and decodes its own rows of each global batch (the eval
pipeline shards questions over processes); the generated tokens are gathered so that every
process holds all outputs, and process 0 writes them (`eval.reports`).

Legend: B questions per process and batch, G = B * processes, P prompt length, N new tokens.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from mcckd_jax import sharding
from mcckd_jax.data import pipeline, records, tokenization
from mcckd_jax.eval import decoding, scoring


@dataclasses.dataclass(frozen=True)
class EvalDataset:
    """A question file to evaluate on. Only "dev" sets may be used to choose checkpoints."""

    name: str
    path: str
    role: Literal["dev", "test"] = "test"

    def __post_init__(self):
        if self.role not in ("dev", "test"):
            raise ValueError(f"dataset {self.name}: role must be dev or test, got {self.role!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How to decode and score."""

    datasets: tuple[EvalDataset, ...] = ()
    batch_size: int = 16  # B: questions per batch on each process
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)  # allowed P (one compile each)
    sampling: decoding.SamplingConfig = decoding.SamplingConfig()  # temperature 0: greedy
    num_samples: int = 1  # >1: self-consistency, a majority vote over sampled rationales
    seed: int = 0  # sampling seed
    max_questions: int | None = None  # evaluate only the first N questions of each file
    progress_bar: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("batch_size and num_samples must be >= 1")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError(f"max_questions must be >= 1 (or unset for all questions), got "
                             f"{self.max_questions}")
        if self.num_samples > 1 and self.sampling.temperature <= 0:
            raise ValueError(f"num_samples={self.num_samples} votes over samples: set a "
                             "temperature > 0 (greedy samples would all be the same)")
        names = [dataset.name for dataset in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be distinct: {names}")


@dataclasses.dataclass(frozen=True)
class EvalData:
    """One dataset, read and tokenized."""

    dataset: EvalDataset
    records: tuple[records.Record, ...]
    prompts: tokenization.EncodedPrompts


def load_eval_data(config: EvalConfig, tokenizer: Any,
                   tokenization_config: tokenization.TokenizationConfig) -> list[EvalData]:
    """Reads and tokenizes every dataset of `config` (bad records raise RecordError)."""
    loaded = []
    for dataset in config.datasets:
        read = records.read_records(dataset.path, task=tokenization_config.task)
        rows = tuple(read.records[:config.max_questions])
        if not rows:
            raise records.RecordError(dataset.path, None, None, "no question to evaluate")
        prompts, _ = tokenization.encode_prompts(rows, tokenizer, tokenization_config)
        loaded.append(EvalData(dataset=dataset, records=rows, prompts=prompts))
    return loaded


def _decode_text(tokens_N: np.ndarray, tokenizer: Any, eos_ids: Sequence[int]) -> str:
    """The generated text up to (not including) the first EOS."""
    ends = np.flatnonzero(np.isin(tokens_N, eos_ids))
    kept = tokens_N[:ends[0]] if len(ends) else tokens_N
    return tokenizer.decode(kept.tolist(), skip_special_tokens=True).strip()


def evaluate(model: nnx.Module, data: EvalData, tokenizer: Any, *, config: EvalConfig,
             tokenization_config: tokenization.TokenizationConfig, mesh: jax.sharding.Mesh,
             should_stop: Callable[[], bool] = lambda: False,
             ) -> tuple[list[scoring.Prediction], dict[str, Any]] | None:
    """(predictions in file order, summary) of `model` on `data`; None when `should_stop()`
    turned true between batches (nothing partial is returned)."""
    pipeline_config = pipeline.PipelineConfig(
        batch_size=config.batch_size, bucket_lengths=config.prompt_buckets,
        encoder_bucket_lengths=config.prompt_buckets, shuffle=False, num_epochs=1)
    batches = pipeline.eval_dataset(data.prompts, pipeline_config)
    sharding.check_batch_divides(
        config.batch_size * jax.process_count(), mesh,
        what=f"the eval batch size ({config.batch_size} per process x {jax.process_count()} "
             "processes): mcckd-eval's --batch_size, or dev_eval.batch_size in training")
    batch_sharding = sharding.batch_sharding(mesh)
    eos_ids = (tokenization.eos_id(tokenizer, tokenization_config),)
    pad = tokenization.pad_id(tokenizer)
    encoder = data.prompts.layout == "encoder_decoder"
    base_rng = jax.random.key(config.seed)
    predictions: dict[int, scoring.Prediction] = {}  # question -> prediction
    correct, started = 0, time.perf_counter()
    bar = tqdm.tqdm(total=data.prompts.num_questions, unit="q", dynamic_ncols=True,
                    desc=data.dataset.name,
                    disable=not config.progress_bar or jax.process_index() != 0)
    with bar:
        for batch_index, batch in enumerate(batches):
            if should_stop():
                return None
            tokens_BP = batch["encoder_tokens" if encoder else "prompt_tokens"]
            mask_BP = batch["encoder_mask" if encoder else "prompt_mask"]
            prompt_GP, mask_GP = sharding.global_batch((tokens_BP, mask_BP), batch_sharding)
            questions_G = np.asarray(multihost_utils.process_allgather(
                batch["question_index"], tiled=True)).reshape(-1)
            samples_SGN = []
            for sample in range(config.num_samples):
                rng = jax.random.fold_in(jax.random.fold_in(base_rng, batch_index), sample)
                generated_GN = decoding.generate(model, prompt_GP, mask_GP, sampling=config.sampling,
                                                 eos_token_ids=eos_ids, pad_token_id=pad, rng=rng)
                samples_SGN.append(np.asarray(multihost_utils.process_allgather(
                    generated_GN, tiled=True)))
            for row, question in enumerate(questions_G):
                if question < 0:
                    continue
                texts = [_decode_text(s[row], tokenizer, eos_ids) for s in samples_SGN]
                record = data.records[data.prompts.record_index[question]]
                prediction = scoring.score(record, texts, tokenization_config.task)
                predictions[int(question)] = prediction
                correct += prediction.correct
            done = len(predictions)
            bar.update(int((questions_G >= 0).sum()))
            bar.set_postfix({"acc": f"{correct / max(done, 1):.3f}",
                             "q/s": f"{done / (time.perf_counter() - started):.2f}"},
                            refresh=False)
    in_order = [predictions[q] for q in range(data.prompts.num_questions)]
    summary = {"role": data.dataset.role, "path": str(pathlib.Path(data.dataset.path)),
               **scoring.summarize(in_order),
               "seconds": round(time.perf_counter() - started, 2)}
    return in_order, summary
