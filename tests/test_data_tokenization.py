"""Tokenization with real tokenizers: the answer span, the loss region, the prompt.

Every check decodes token ids with the tokenizer and compares with the prepared text (which
was written without any tokenizer): the tokens at the span targets must decode to the answer,
the loss-masked targets to the rationale and EOS, the rest to the prompt. Tokenizers: SmolLM2
(byte-level BPE from its GGUF file, decoder-only) and a T5-style unigram sentencepiece model
trained by the test (encoder-decoder).
"""

import unicodedata

import numpy as np
import pytest

from data_testing import prepared_svamp, smollm2_tokenizer, t5_tokenizer
from mcckd_jax.data import answers, batching
from mcckd_jax.data.records import Record
from mcckd_jax.data.tokenization import (TokenizationConfig, encode_prompts, encode_records,
                                         prompt_text)


def _question_batch(data, q):
    """All rationales of question q in one batch row."""
    first, last = data.question_rationales[q:q + 2]
    rationales = list(range(first, last))
    lengths = data.sequence_lengths()[rationales]
    prompt = len(data.prompt(q))
    return batching.build_train_batch(data, [q], [rationales], num_rationales=len(rationales),
                                      length=int(lengths.max()), span_length=8,
                                      encoder_length=prompt), rationales


def _squash(text):
    """What a T5 sentencepiece round trip keeps: NFKC text with runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _check_spans_and_loss_region(tokenizer, layout, shared_data, exact_text):
    records = prepared_svamp(shared_data).records
    config = TokenizationConfig(task="svamp", layout=layout, max_length=2048)
    data, report = encode_records(records, tokenizer, config)
    assert report["rationales_out"] == report["rationales_in"] == sum(
        len(r.rationales) for r in records)
    assert data.num_questions == len(records)
    eos = tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id)
    for q in range(data.num_questions):
        record = records[data.record_index[q]]
        answer = answers.normalize_label(record.label, "svamp")
        batch, rationales = _question_batch(data, q)
        num_span = int(batch["span_mask"][0].sum())
        for k, rationale in enumerate(record.rationales):
            span = batch["targets"][0, k, batch["span_positions"][0, k, :num_span]]
            assert tokenizer.decode(span).strip() == answer, (q, k)
            trained = tokenizer.decode(batch["targets"][0, k][batch["loss_mask"][0, k]])
            if exact_text:
                assert trained == rationale + eos
            else:
                assert _squash(trained) == _squash(rationale) + eos
        if layout == "decoder_only":
            prompt = batch["tokens"][0, 0, :len(data.prompt(q))]
            assert tokenizer.decode(prompt) == prompt_text(record.question, tokenizer, config)
        else:
            encoder = batch["encoder_tokens"][0][batch["encoder_mask"][0]]
            assert _squash(tokenizer.decode(encoder)) == _squash(
                prompt_text(record.question, tokenizer, config)) + eos


def test_smollm2_spans_decode_to_the_answer(shared_data):
    _check_spans_and_loss_region(smollm2_tokenizer(), "decoder_only", shared_data, True)


def test_sentencepiece_t5_spans_decode_to_the_answer(shared_data):
    _check_spans_and_loss_region(t5_tokenizer(shared_data), "encoder_decoder", shared_data,
                                 False)


def _record(*rationales, answer="5700"):
    return Record(question="How many people can ride?", label=answer, answer=answer,
                  rationales=rationales, uid="hand:0")


def test_questions_keep_only_rationales_whose_span_ids_agree():
    tokenizer = smollm2_tokenizer()
    record = _record("20 x 285 = 5700 people.\nTherefore, the answer is 5700.",
                     "285 x 20 = 5,700 people.\nTherefore, the answer is 5,700.",
                     "So 5700 in all.\nTherefore, the answer is 5700.")
    data, report = encode_records([record], tokenizer, TokenizationConfig(task="gsm8k"))
    assert report["rationale_drops"]["span_mismatch"] == 1
    assert report["questions_with_span_disagreement"] == 1
    assert tokenizer.decode(data.span(0)) == "5700"
    kept = [tokenizer.decode(data.rationale(r)) for r in range(2)]
    assert kept[0].startswith("20 x 285") and kept[1].startswith("So 5700")


def test_truncation_never_cuts_the_span():
    tokenizer = smollm2_tokenizer()
    rationale = "He had 30 and got 2 more, so 30 + 2 = 32.\nTherefore, the answer is 32."
    record = _record(rationale, answer="32")
    config = TokenizationConfig(task="gsm8k")
    full, _ = encode_records([record], tokenizer, config)
    needed = int(full.sequence_lengths()[0])
    # One token short: only the EOS goes; the span survives and is counted as truncated.
    data, report = encode_records([record], tokenizer,
                                  TokenizationConfig(task="gsm8k", max_length=needed - 1))
    assert report["truncated_after_span"] == 1 and report["rationales_out"] == 1
    assert tokenizer.decode(data.rationale(0)) == rationale
    batch, _ = _question_batch(data, 0)
    assert batch["tokens"].shape[-1] == needed - 1
    # Three short: ".", then the answer's last digit would go: the rationale is dropped.
    data, report = encode_records([record], tokenizer,
                                  TokenizationConfig(task="gsm8k", max_length=needed - 3))
    assert report["rationale_drops"]["span_truncated"] == 1
    assert report["question_drops"]["no_usable_rationale"] == 1 and data.num_questions == 0


def test_unlocatable_answers_and_long_prompts_are_counted():
    tokenizer = smollm2_tokenizer()
    wrong = _record("So it is 5,701.", "Therefore, the answer is 5700.")
    data, report = encode_records([wrong], tokenizer, TokenizationConfig(task="gsm8k"))
    assert report["rationale_drops"]["no_answer_span"] == 1 and report["rationales_out"] == 1
    data, report = encode_records([wrong], tokenizer,
                                  TokenizationConfig(task="gsm8k", max_length=8))
    assert report["question_drops"]["prompt_too_long"] == 1 and data.num_questions == 0


def test_chat_template_prompt_and_eval_prompts():
    tokenizer = smollm2_tokenizer()
    config = TokenizationConfig(task="gsm8k", use_chat_template=True)
    text = prompt_text("How many?", tokenizer, config)
    assert "<|im_start|>user\nQuestion: How many?\nAnswer:\n<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    custom = TokenizationConfig(task="gsm8k", use_chat_template=True, prompt_template="{question}",
                                chat_template="{% for m in messages %}[{{ m['content'] }}]"
                                              "{% endfor %}")
    assert prompt_text("How many?", tokenizer, custom) == "[How many?]"
    records = [_record("x"), Record(question="word " * 40 + "How many?", label="1")]
    prompts, report = encode_prompts(records, tokenizer,
                                     TokenizationConfig(task="gsm8k", max_length=16))
    assert report == {"questions": 2, "prompts_truncated": 1}
    assert len(prompts.prompt(1)) == 16
    assert tokenizer.decode(prompts.prompt(1)).endswith("How many?\nAnswer:\n")
    np.testing.assert_array_equal(prompts.record_index, [0, 1])


def test_config_is_checked():
    with pytest.raises(ValueError, match="layout"):
        TokenizationConfig(layout="encoder_only")
    with pytest.raises(ValueError, match="question"):
        TokenizationConfig(prompt_template="Q:")
