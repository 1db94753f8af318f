"""Batch-contract arrays from encoded questions (pure numpy, no Grain, no JAX).

Train batches follow the batch contract (README, "The batch contract"):

| field | shape | dtype | meaning |
| --- | --- | --- | --- |
| tokens | [B, K, L] | int32 | prompt + rationale (decoder side for T5), right-padded |
| targets | [B, K, L] | int32 | tokens shifted left by one (the next token) |
| loss_mask | [B, K, L] | bool | True where targets is a rationale token or the EOS |
| rationale_mask | [B, K] | bool | True where rationale k exists |
| span_positions | [B, K, S] | int32 | position whose prediction is answer token s (0 if none) |
| span_mask | [B, S] | bool | True for real answer tokens |
| question_index | [B] | int32 | index of the question in the encoded data; -1 for padding |

Encoder-decoder batches add encoder_tokens [B, E] int32 (the question, right-padded) and
encoder_mask [B, E] bool. Eval batches hold prompts only: decoder-only prompt_tokens [B, P]
left-padded (so that generation continues at the same position in every row) with
prompt_mask [B, P]; encoder-decoder encoder_tokens/encoder_mask [B, E]; and question_index.

Legend: B questions, K rationales per question, L sequence length, S answer-span tokens,
E encoder length, P prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mcckd_jax.data.tokenization import EncodedDataset, EncodedPrompts


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; ValueError when none is large enough."""
    for bucket in sorted(buckets):
        if bucket >= length:
            return bucket
    raise ValueError(f"a sequence of {length} tokens exceeds the largest bucket {max(buckets)}")


def fill_row(data: EncodedDataset, q: int, r: int, tokens_L: np.ndarray, targets_L: np.ndarray,
              loss_mask_L: np.ndarray, span_positions_S: np.ndarray) -> None:
    """Writes rationale r of question q into one row of each field."""
    if data.layout == "encoder_decoder":
        prefix = np.asarray([data.decoder_start_id], np.int32)
    else:
        prefix = data.prompt(q)
    sequence = np.concatenate([prefix, data.rationale(r)])
    size = len(sequence) - 1
    tokens_L[:size] = sequence[:-1]
    targets_L[:size] = sequence[1:]
    # targets[t] is rationale token t - len(prefix) + 1, the first at t = len(prefix) - 1.
    loss_mask_L[len(prefix) - 1:size] = True
    span_length = data.span_offsets[q + 1] - data.span_offsets[q]
    span_positions_S[:span_length] = len(prefix) - 1 + data.span_start[r] + np.arange(span_length)


def train_batch_spec(batch_size: int, num_rationales: int, length: int, span_length: int,
                     encoder_length: int | None = None) -> dict[str, tuple[tuple[int, ...], type]]:
    """{field: (shape, numpy dtype)} of a train batch (the table in the module docstring);
    with `encoder_length` the encoder-decoder fields too."""
    shape_BKL = (batch_size, num_rationales, length)
    spec = {"tokens": (shape_BKL, np.int32), "targets": (shape_BKL, np.int32),
            "loss_mask": (shape_BKL, np.bool_),
            "rationale_mask": ((batch_size, num_rationales), np.bool_),
            "span_positions": ((batch_size, num_rationales, span_length), np.int32),
            "span_mask": ((batch_size, span_length), np.bool_),
            "question_index": ((batch_size,), np.int32)}
    if encoder_length is not None:
        spec["encoder_tokens"] = ((batch_size, encoder_length), np.int32)
        spec["encoder_mask"] = ((batch_size, encoder_length), np.bool_)
    return spec


def build_train_batch(data: EncodedDataset, questions_B: Sequence[int],
                      choices_B: Sequence[Sequence[int]], *, num_rationales: int, length: int,
                      span_length: int, encoder_length: int | None = None) -> dict[str, np.ndarray]:
    """The train fields for B questions.

    Args:
      data: encoded questions.
      questions_B: question indices; -1 marks a padding slot (all masks False).
      choices_B: per question, the rationale indices (global, into `data`) to use, at most K.
      num_rationales: K. length: L. span_length: S. encoder_length: E (encoder-decoder only).
    """
    batch_size = len(questions_B)
    spec = train_batch_spec(batch_size, num_rationales, length, span_length,
                            encoder_length if data.layout == "encoder_decoder" else None)
    padded = ("tokens", "targets", "encoder_tokens")
    batch = {name: np.full(shape, data.pad_id if name in padded else 0, dtype)
             for name, (shape, dtype) in spec.items()}
    batch["question_index"][:] = questions_B
    for b, (q, chosen) in enumerate(zip(questions_B, choices_B)):
        if q < 0:
            continue
        for k, r in enumerate(chosen):
            fill_row(data, q, r, batch["tokens"][b, k], batch["targets"][b, k],
                      batch["loss_mask"][b, k], batch["span_positions"][b, k])
            batch["rationale_mask"][b, k] = True
        batch["span_mask"][b, :data.span_offsets[q + 1] - data.span_offsets[q]] = True
        if data.layout == "encoder_decoder":
            prompt = data.prompt(q)
            batch["encoder_tokens"][b, :len(prompt)] = prompt
            batch["encoder_mask"][b, :len(prompt)] = True
    return batch


def build_eval_batch(prompts: EncodedPrompts, questions_B: Sequence[int], *,
                     length: int) -> dict[str, np.ndarray]:
    """The eval fields for B questions (-1 = padding); `length` is P or E."""
    batch_size = len(questions_B)
    tokens_BP = np.full((batch_size, length), prompts.pad_id, np.int32)
    mask_BP = np.zeros((batch_size, length), bool)
    for b, q in enumerate(questions_B):
        if q < 0:
            continue
        prompt = prompts.prompt(q)
        if prompts.layout == "encoder_decoder":
            tokens_BP[b, :len(prompt)], mask_BP[b, :len(prompt)] = prompt, True
        else:
            tokens_BP[b, length - len(prompt):], mask_BP[b, length - len(prompt):] = prompt, True
    names = (("encoder_tokens", "encoder_mask") if prompts.layout == "encoder_decoder"
             else ("prompt_tokens", "prompt_mask"))
    return {names[0]: tokens_BP, names[1]: mask_BP,
            "question_index": np.asarray(questions_B, np.int32).reshape(batch_size)}
