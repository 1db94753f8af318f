"""Tokenizing prepared records for a student: prompts, rationales, answer spans.

`encode_records` is one pass over the prepared data, done once per process before the Grain
pipeline starts: it tokenizes every prompt and rationale with a Hugging Face tokenizer, locates
each rationale's answer span (`spans`), keeps per question only the rationales whose span token
ids agree, and drops (and counts) what cannot be trained on. The result is a handful of flat
int32 arrays, cheap to send to Grain worker processes.

Layouts. Decoder-only (LLaMA): a sequence is prompt + rationale + EOS; the loss covers the
rationale and the EOS. Encoder-decoder (T5): the question goes to the encoder; the decoder
sequence is decoder-start + rationale + EOS, and span positions index decoder positions.

Legend: N questions, R rationales (all questions), T tokens (flat storage).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from mcckd_jax.data import answers, spans
from mcckd_jax.data.records import Record

Layout = Literal["decoder_only", "encoder_decoder"]
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


@dataclasses.dataclass(frozen=True)
class TokenizationConfig:
    """How questions and rationales become token ids."""

    task: str = "gsm8k"  # answers.TASKS entry used to locate the answer in each rationale
    layout: Layout = "decoder_only"  # "decoder_only" (LLaMA) or "encoder_decoder" (T5)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE  # question -> prompt text ({question})
    use_chat_template: bool = False  # wrap the prompt as a user turn of the chat template
    chat_template: str | None = None  # Jinja template replacing the tokenizer's own
    eos_token: str | None = None  # ends every rationale; default the tokenizer's EOS
    max_length: int = 512  # most tokens in a (decoder) sequence, L; longer ones are truncated
    max_encoder_length: int = 512  # encoder-decoder: most question tokens; longer are dropped
    max_span_tokens: int = 8  # S: most answer-span tokens; longer spans drop the rationale

    def __post_init__(self):
        answers.check_task(self.task)
        if self.layout not in ("decoder_only", "encoder_decoder"):
            raise ValueError(f"layout must be 'decoder_only' or 'encoder_decoder', got "
                             f"{self.layout!r}")
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{question}'")


@dataclasses.dataclass(frozen=True)
class EncodedDataset:
    """Token ids of the trainable questions, in flat int32 arrays.

    Question q owns rationales [question_rationales[q], question_rationales[q + 1]); rationale r
    has tokens rationale_tokens[rationale_offsets[r]:rationale_offsets[r + 1]] (EOS included,
    unless truncation removed it) and its answer span starts at token span_start[r]. The span
    ids of question q are span_tokens[span_offsets[q]:span_offsets[q + 1]].
    """

    layout: Layout
    pad_id: int
    decoder_start_id: int  # first decoder input (encoder-decoder); unused for decoder-only
    prompt_tokens: np.ndarray  # [T] prompts (encoder inputs for encoder-decoder)
    prompt_offsets: np.ndarray  # [N + 1]
    rationale_tokens: np.ndarray  # [T]
    rationale_offsets: np.ndarray  # [R + 1]
    question_rationales: np.ndarray  # [N + 1]
    span_start: np.ndarray  # [R]
    span_tokens: np.ndarray  # [T]
    span_offsets: np.ndarray  # [N + 1]
    record_index: np.ndarray  # [N] index of the question in the records given to encode

    @property
    def num_questions(self) -> int:
        return len(self.prompt_offsets) - 1

    def prompt(self, q: int) -> np.ndarray:
        return self.prompt_tokens[self.prompt_offsets[q]:self.prompt_offsets[q + 1]]

    def rationale(self, r: int) -> np.ndarray:
        return self.rationale_tokens[self.rationale_offsets[r]:self.rationale_offsets[r + 1]]

    def span(self, q: int) -> np.ndarray:
        return self.span_tokens[self.span_offsets[q]:self.span_offsets[q + 1]]

    def decoder_prefix_length(self, q: int) -> int:
        """Tokens before the rationale on the side that carries it."""
        if self.layout == "encoder_decoder":
            return 1
        return int(self.prompt_offsets[q + 1] - self.prompt_offsets[q])

    def sequence_lengths(self) -> np.ndarray:
        """[R] length L each rationale needs: prefix + rationale - 1 (targets shift by one)."""
        prefix = (np.ones(self.num_questions, np.int64) if self.layout == "encoder_decoder"
                  else np.diff(self.prompt_offsets))
        owners = np.repeat(np.arange(self.num_questions), np.diff(self.question_rationales))
        return prefix[owners] + np.diff(self.rationale_offsets) - 1


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None) -> Any:
    """A Hugging Face tokenizer from a local directory, or from a GGUF file.

    `path` may be a directory (with `gguf_file` naming a file in it, or not) or a .gguf file.
    Nothing is downloaded.
    """
    from transformers import AutoTokenizer  # Slow to import; only encoding needs it.

    path = os.fspath(path)
    if path.endswith(".gguf") and gguf_file is None:
        path, gguf_file = os.path.split(path)
    where = os.path.join(path, gguf_file) if gguf_file else path
    if not os.path.exists(where):
        raise FileNotFoundError(f"{where}: no such tokenizer file or directory (tokenizers are "
                                "read from local paths only; nothing is downloaded)")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as error:  # transformers' messages suggest the hub
        raise ValueError(f"{where}: not a Hugging Face tokenizer ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:300]})") from None


def prompt_text(question: str, tokenizer: Any, config: TokenizationConfig) -> str:
    """The prompt for one question, through the chat template when configured."""
    text = config.prompt_template.format(question=question.strip())
    if not config.use_chat_template:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True,
                                         chat_template=config.chat_template)


def encode_prompt(question: str, tokenizer: Any, config: TokenizationConfig) -> list[int]:
    """Prompt token ids: the tokenizer's own special tokens (BOS for LLaMA, a final EOS for T5's
    encoder), none with a chat template (it writes its own), and no EOS on a decoder prompt."""
    text = prompt_text(question, tokenizer, config)
    ids = tokenizer(text, add_special_tokens=not config.use_chat_template)["input_ids"]
    eos = tokenizer.eos_token_id
    if config.layout == "decoder_only" and ids and ids[-1] == eos and not text.endswith(
            tokenizer.eos_token or "\0"):
        ids = ids[:-1]
    return list(ids)


def eos_id(tokenizer: Any, config: TokenizationConfig) -> int:
    token = config.eos_token or tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if token_id is None:
        raise ValueError("the tokenizer has no EOS token; set TokenizationConfig.eos_token")
    return int(token_id)


def pad_id(tokenizer: Any) -> int:
    """Padding id: the tokenizer's pad token, else its EOS (padding is always masked)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


DROP_REASONS = ("no_answer_span", "span_not_token_aligned", "span_too_long", "span_truncated",
                "span_mismatch")


@dataclasses.dataclass
class _Rationales:
    """One question's usable rationales while encoding."""

    ids: list[list[int]] = dataclasses.field(default_factory=list)
    starts: list[int] = dataclasses.field(default_factory=list)
    span_ids: list[tuple[int, ...]] = dataclasses.field(default_factory=list)


def _encode_rationales(record: Record, prefix_length: int, eos: int, tokenizer: Any,
                       config: TokenizationConfig, counts: collections.Counter) -> _Rationales:
    """Tokenizes one question's rationales, locates their spans, truncates; counts drops."""
    encoded = tokenizer(list(record.rationales), add_special_tokens=False,
                        return_offsets_mapping=True)
    expected = record.answer or answers.normalize_label(record.label, config.task)
    room = config.max_length + 1 - prefix_length  # rationale tokens that fit (targets shift)
    usable = _Rationales()
    for text, ids, offsets in zip(record.rationales, encoded["input_ids"],
                                  encoded["offset_mapping"]):
        found = answers.find_answer(text, config.task, question=record.question)
        if found is None or found.answer != expected:
            counts["no_answer_span"] += 1
            continue
        span = spans.token_span(text, offsets, found.start, found.end)
        if span is None:
            counts["span_not_token_aligned"] += 1
            continue
        if span[1] - span[0] > config.max_span_tokens:
            counts["span_too_long"] += 1
            continue
        ids = list(ids) + [eos]
        if len(ids) > room:
            if span[1] > room:
                counts["span_truncated"] += 1
                continue
            ids = ids[:room]
            counts["truncated"] += 1
        usable.ids.append(ids)
        usable.starts.append(span[0])
        usable.span_ids.append(tuple(ids[span[0]:span[1]]))
    agreeing = spans.agreeing_group(usable.span_ids)
    if len(agreeing) < len(usable.ids):
        counts["span_mismatch"] += len(usable.ids) - len(agreeing)
        counts["questions_with_span_disagreement"] += 1
    return _Rationales(ids=[usable.ids[i] for i in agreeing],
                       starts=[usable.starts[i] for i in agreeing],
                       span_ids=[usable.span_ids[i] for i in agreeing])


def _flat(chunks: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    flat = np.fromiter((t for c in chunks for t in c), np.int32, count=int(offsets[-1]))
    return flat, offsets


def encode_records(records: Sequence[Record], tokenizer: Any,
                   config: TokenizationConfig) -> tuple[EncodedDataset, dict[str, Any]]:
    """Encodes prepared records for training (module docstring).

    Returns:
      (dataset, report): report counts questions and rationales in and out, rationale drops
      by reason (DROP_REASONS), kept rationales that were truncated after their span,
      questions whose rationales disagreed on the span ids, questions dropped because their
      prompt is too long or no rationale survived, and what the length limits alone dropped
      (`length_drops`).
    """
    eos = eos_id(tokenizer, config)
    counts: collections.Counter = collections.Counter()
    prompts, rationales, starts, span_ids, owners, record_index = [], [], [], [], [0], []
    for index, record in enumerate(records):
        prompt = encode_prompt(record.question, tokenizer, config)
        limit = (config.max_encoder_length if config.layout == "encoder_decoder"
                 else config.max_length - 1)
        if len(prompt) > limit:
            counts["prompt_too_long"] += 1
            counts["rationales_of_long_prompts"] += len(record.rationales)
            continue
        prefix = 1 if config.layout == "encoder_decoder" else len(prompt)
        truncated_before = counts["span_truncated"]
        usable = _encode_rationales(record, prefix, eos, tokenizer, config, counts)
        if not usable.ids:
            counts["no_usable_rationale"] += 1
            if counts["span_truncated"] - truncated_before == len(record.rationales):
                counts["questions_lost_to_max_length"] += 1
            continue
        prompts.append(prompt)
        rationales.extend(usable.ids)
        starts.extend(usable.starts)
        span_ids.append(usable.span_ids[0])
        owners.append(owners[-1] + len(usable.ids))
        record_index.append(index)
    prompt_tokens, prompt_offsets = _flat(prompts)
    rationale_tokens, rationale_offsets = _flat(rationales)
    span_tokens, span_offsets = _flat(span_ids)
    start_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_id(tokenizer)
    dataset = EncodedDataset(
        layout=config.layout, pad_id=pad_id(tokenizer), decoder_start_id=int(start_id),
        prompt_tokens=prompt_tokens, prompt_offsets=prompt_offsets,
        rationale_tokens=rationale_tokens, rationale_offsets=rationale_offsets,
        question_rationales=np.asarray(owners, np.int64), span_start=np.asarray(starts, np.int64),
        span_tokens=span_tokens, span_offsets=span_offsets,
        record_index=np.asarray(record_index, np.int64))
    return dataset, _encoding_report(records, dataset, len(rationales), counts)


def _encoding_report(records: Sequence[Record], dataset: EncodedDataset, rationales_out: int,
                     counts: collections.Counter) -> dict[str, Any]:
    return {
        "questions_in": len(records), "questions_out": dataset.num_questions,
        "rationales_in": sum(len(r.rationales) for r in records),
        "rationales_out": rationales_out,
        "rationale_drops": {reason: counts[reason] for reason in DROP_REASONS},
        "truncated_after_span": counts["truncated"],
        "questions_with_span_disagreement": counts["questions_with_span_disagreement"],
        "question_drops": {"prompt_too_long": counts["prompt_too_long"],
                           "no_usable_rationale": counts["no_usable_rationale"]},
        # What the length limits alone cost: questions whose prompt is too long or whose every
        # rationale lost its answer span to truncation, and the rationales of both.
        "length_drops": {
            "questions": counts["prompt_too_long"] + counts["questions_lost_to_max_length"],
            "rationales": counts["rationales_of_long_prompts"] + counts["span_truncated"]},
    }


def check_vocabulary(token_arrays: Sequence[np.ndarray], vocab_size: int, tokenizer: Any) -> None:
    """Raises ValueError (one line) when a token id of the encoded data does not exist in a
    model of `vocab_size` entries: the tokenizer and the student do not belong together (on
    an accelerator such an id reads garbage; on CPU it becomes a NaN loss)."""
    largest = max((int(array.max()) for array in token_arrays if array.size), default=-1)
    if largest >= vocab_size:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name} ({len(tokenizer)} tokens) gives token id {largest}, but the "
            f"student's vocabulary has {vocab_size} entries: use the student's own tokenizer, "
            "or a student whose vocab_size covers this one (student.architecture.vocab_size)")


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
    """Prompt token ids of evaluation questions (no rationales), in flat int32 arrays."""

    layout: Layout
    pad_id: int
    prompt_tokens: np.ndarray  # [T]
    prompt_offsets: np.ndarray  # [N + 1]
    record_index: np.ndarray  # [N] index of the question in the records given to encode

    @property
    def num_questions(self) -> int:
        return len(self.prompt_offsets) - 1

    def prompt(self, q: int) -> np.ndarray:
        return self.prompt_tokens[self.prompt_offsets[q]:self.prompt_offsets[q + 1]]


def encode_prompts(records: Sequence[Record], tokenizer: Any,
                   config: TokenizationConfig) -> tuple[EncodedPrompts, dict[str, Any]]:
    """Encodes the questions of `records` for evaluation; every question is kept.

    A prompt longer than the limit (max_length for decoder-only, max_encoder_length for
    encoder-decoder) keeps its last tokens, where the question is asked, and is counted.
    """
    limit = config.max_encoder_length if config.layout == "encoder_decoder" else config.max_length
    prompts, truncated = [], 0
    for record in records:
        prompt = encode_prompt(record.question, tokenizer, config)
        if len(prompt) > limit:
            prompt, truncated = prompt[-limit:], truncated + 1
        prompts.append(prompt)
    prompt_tokens, prompt_offsets = _flat(prompts)
    encoded = EncodedPrompts(layout=config.layout, pad_id=pad_id(tokenizer),
                             prompt_tokens=prompt_tokens, prompt_offsets=prompt_offsets,
                             record_index=np.arange(len(records), dtype=np.int64))
    return encoded, {"questions": len(records), "prompts_truncated": truncated}
