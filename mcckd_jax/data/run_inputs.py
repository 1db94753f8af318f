"""A run's inputs: the `data` section of its config, its tokenizer and its tokenized training
data. Training and evaluation load them the same way, from here."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mcckd_jax.data import records, tokenization
from mcckd_jax.data.pipeline import PipelineConfig
from mcckd_jax.data.tokenization import TokenizationConfig

if TYPE_CHECKING:
    from mcckd_jax.models.pretrained import StudentConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prepared training data and how it becomes batches."""

    train_files: tuple[str, ...] = ()  # prepared JSONL (mcckd-prepare) or MCC-KD JSON files
    tokenizer: str | None = None  # local tokenizer dir or .gguf; None: the student checkpoint's
    tokenizer_gguf_file: str | None = None  # GGUF file inside `tokenizer`
    skip_bad_records: bool = False  # count and skip malformed records instead of stopping
    max_length_drop_fraction: float = 0.2  # most questions/rationales the length limits may drop
    tokenization: TokenizationConfig = TokenizationConfig()  # prompt template, lengths, task
    pipeline: PipelineConfig = PipelineConfig()  # batch size, K, buckets, seed, workers

    def __post_init__(self):
        if not 0.0 <= self.max_length_drop_fraction <= 1.0:
            raise ValueError("max_length_drop_fraction must be within [0, 1], got "
                             f"{self.max_length_drop_fraction}")


def load_run_tokenizer(data: DataConfig, student: StudentConfig) -> Any:
    """The tokenizer of a run: data.tokenizer, else the student checkpoint's."""
    tokenizer_path = data.tokenizer or student.checkpoint
    if tokenizer_path is None:
        raise ValueError("data.tokenizer is not set and the student has no checkpoint to take "
                         "the tokenizer from")
    return tokenization.load_tokenizer(
        tokenizer_path, data.tokenizer_gguf_file if data.tokenizer else student.gguf_file)


def load_train_data(data: DataConfig, tokenizer: Any, layout: str) -> tokenization.EncodedDataset:
    """Reads and tokenizes the training files (the same on every process)."""
    if not data.train_files:
        raise ValueError("data.train_files is empty: give prepared files (mcckd-prepare output)")
    read = records.read_records(data.train_files, skip_bad_records=data.skip_bad_records,
                                require_rationales=True, task=data.tokenization.task)
    if read.skipped:
        log.warning("skipped %d bad records; first: %s", len(read.skipped), read.skipped[0])
    encoded, report = tokenization.encode_records(
        read.records, tokenizer, dataclasses.replace(data.tokenization, layout=layout))
    log.info("training data: %s", report)
    if encoded.num_questions == 0:
        raise ValueError(f"no trainable question in {', '.join(data.train_files)}: {report}")
    check_length_drops(report, data)
    return encoded


def check_length_drops(report: Mapping, data: DataConfig) -> None:
    """Warns about what data.tokenization.max_length (and max_encoder_length) dropped, and
    stops when it is more than data.max_length_drop_fraction of the questions or rationales.

    Args:
      report: `tokenization.encode_records`'s report (counts in, and `length_drops`).
    """
    lost = report["length_drops"]
    if not (lost["questions"] or lost["rationales"]):
        return
    shares = {kind: lost[kind] / max(report[f"{kind}_in"], 1) for kind in lost}
    text = (f"the length limits (data.tokenization.max_length={data.tokenization.max_length}, "
            f"max_encoder_length={data.tokenization.max_encoder_length}) drop "
            f"{lost['questions']} of {report['questions_in']} questions "
            f"({shares['questions']:.0%}) and {lost['rationales']} of {report['rationales_in']} "
            f"rationales ({shares['rationales']:.0%})")
    if max(shares.values()) > data.max_length_drop_fraction:
        raise ValueError(f"{text}, more than data.max_length_drop_fraction="
                         f"{data.max_length_drop_fraction}: raise max_length, or allow it with "
                         "data.max_length_drop_fraction")
    log.warning("%s", text)
