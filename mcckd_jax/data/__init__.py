"""Multi-CoT data: records and readers, answers, selection, prepare, tokenization, Grain pipelines.

Data flow (README, "Architecture"): `records` reads raw teacher rationales, `answers`
extracts final answers, `selection` keeps correct, distinct, diverse ones, `prepare` writes the
prepared JSONL;
`tokenization` and `spans` encode it for a tokenizer and locate the answer span, `batching`
builds the batch-contract arrays and `pipeline` serves them through Grain.

Only the light modules are imported here; `tokenization` (transformers) and `pipeline` (Grain)
are imported on use, so that Grain worker processes start quickly.
"""

from mcckd_jax.data.answers import (AnswerMatch, answers_match, extract_answer, find_answer,
                                    normalize_label)
from mcckd_jax.data.prepare import PrepareConfig, prepare_files, prepare_records
from mcckd_jax.data.records import Record, RecordError, read_records
from mcckd_jax.data.selection import SelectionConfig, select_rationales

__all__ = [
    "AnswerMatch",
    "PrepareConfig",
    "Record",
    "RecordError",
    "SelectionConfig",
    "answers_match",
    "extract_answer",
    "find_answer",
    "normalize_label",
    "prepare_files",
    "prepare_records",
    "read_records",
    "select_rationales",
]
