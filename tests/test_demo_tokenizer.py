"""Demo tokenizer: exact round trips, single-digit tokens, offline loading, answer spans."""

import re

import pytest
import transformers

from mcckd_jax.data import prepare, records, selection
from mcckd_jax.data.tokenization import (DEFAULT_PROMPT_TEMPLATE, TokenizationConfig,
                                         encode_records, load_tokenizer)
from mcckd_jax.demo import dataset, problems, tokenizer

CONFIG = dataset.DemoDataConfig(train=300, dev=40, test=40, seed=11)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Generated rows, the trained tokenizer and its saved folder."""
    splits = dataset.draw_splits(CONFIG)
    train_rows, drafts = dataset.train_records(splits["train"], CONFIG)
    trained = tokenizer.train_tokenizer(tokenizer.corpus(train_rows))
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(trained, folder)
    eval_rows = dataset.eval_records(splits["dev"]) + dataset.eval_records(splits["test"])
    return {"train": train_rows, "eval": eval_rows, "trained": trained, "folder": folder}


@pytest.fixture(scope="module")
def loaded(demo):
    return load_tokenizer(demo["folder"])


def _texts(rows):
    prompts = [DEFAULT_PROMPT_TEMPLATE.format(question=row["instruction"]) for row in rows]
    outputs = [o for row in rows for o in ([row["output"]] if isinstance(row["output"], str)
                                           else row["output"])]
    return prompts + outputs


def test_decode_inverts_encode_exactly_on_generated_text(demo, loaded):
    texts = _texts(demo["train"]) + _texts(demo["eval"])  # eval text was not trained on
    encoded = loaded(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded):
        assert loaded.decode(ids) == text
        assert loaded.unk_token_id not in ids
    with_bos = loaded(texts[0])["input_ids"]
    assert with_bos[0] == loaded.bos_token_id and loaded.eos_token_id not in with_bos
    assert loaded.decode(with_bos, skip_special_tokens=True) == texts[0]


def test_each_digit_is_its_own_token(demo, loaded):
    ids = loaded("He has 12 + 305 = 317 apples.", add_special_tokens=False)["input_ids"]
    pieces = loaded.convert_ids_to_tokens(ids)
    assert [p for p in pieces if re.search(r"\d", p)] == ["▁1", "2", "▁3", "0", "5", "▁3", "1",
                                                          "7"]
    for piece in demo["trained"].get_vocab():
        assert len(re.findall(r"\d", piece)) <= 1, piece
    assert set(loaded.convert_ids_to_tokens(loaded("é", add_special_tokens=False)["input_ids"])
               ) == {"<unk>"}


def test_whole_numbers_become_single_tokens_and_round_trip(demo):
    trained = tokenizer.train_tokenizer(tokenizer.corpus(demo["train"]), whole_numbers=True)
    pieces = trained.encode("He has 12 + 5 = 17 apples.", add_special_tokens=False).tokens
    assert [p for p in pieces if re.search(r"\d", p)] == ["▁12", "▁5", "▁17"]
    for piece in trained.get_vocab():  # digits merge only with digits (and the space before)
        assert not re.search(r"\d", piece) or re.fullmatch(r"▁?\d+", piece), piece
    for text in _texts(demo["train"]) + _texts(demo["eval"]) + ["It costs 98765 dollars."]:
        ids = trained.encode(text, add_special_tokens=False).ids
        assert trained.decode(ids) == text


def test_special_tokens_and_size(demo, loaded):
    assert len(loaded) == demo["trained"].get_vocab_size() <= tokenizer.DEFAULT_VOCAB_SIZE
    assert [loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id,
            loaded.pad_token_id] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        tokenizer.train_tokenizer(["a"], vocab_size=50)


def test_transformers_auto_tokenizer_loads_the_folder_offline(demo, loaded):
    auto = transformers.AutoTokenizer.from_pretrained(demo["folder"], local_files_only=True)
    text = demo["eval"][0]["output"]
    assert auto(text)["input_ids"] == loaded(text)["input_ids"]
    assert auto.decode(auto(text)["input_ids"], skip_special_tokens=True) == text
    assert auto.pad_token == "<pad>" and auto.eos_token == "</s>"


def test_answer_spans_are_found_for_every_prepared_rationale(demo, loaded, tmp_path):
    source = tmp_path / "train.json"
    source.write_text(dataset.json_list(demo["train"]))
    read = records.read_records(source, require_rationales=True, task=problems.DEMO_TASK)
    prepared = prepare.prepare_records(read.records, prepare.PrepareConfig(
        task=problems.DEMO_TASK, selection=selection.SelectionConfig(num_rationales=4)))
    config = TokenizationConfig(task=problems.DEMO_TASK, max_length=128, max_span_tokens=2)
    encoded, report = encode_records(prepared.records, loaded, config)
    assert report["questions_out"] == len(prepared.records) == CONFIG.train
    assert report["rationales_out"] == report["rationales_in"]
    assert set(report["rationale_drops"].values()) == {0}
    assert report["truncated_after_span"] == 0
    for q in range(encoded.num_questions):
        record = prepared.records[encoded.record_index[q]]
        # The span decodes to the label: an independent check of where spans_start points.
        assert loaded.decode(encoded.span(q)).strip() == record.label
        first = encoded.question_rationales[q]
        start = encoded.span_start[first]
        assert list(encoded.rationale(first)[start:start + len(encoded.span(q))]) == list(
            encoded.span(q))


def test_rationales_are_short(demo, loaded):
    lengths = [len(ids) for ids in loaded([o for row in demo["train"] for o in row["output"]],
                                          add_special_tokens=False)["input_ids"]]
    prompts = [len(ids) for ids in loaded(_texts(demo["eval"])[:len(demo["eval"])])["input_ids"]]
    assert sum(lengths) / len(lengths) < 50 and max(lengths) <= 70
    assert max(prompts) <= 50
