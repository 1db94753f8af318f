"""mcckd-demo-data: the files it writes, its summary, and all-or-nothing writing."""

import json
import re
import subprocess
import sys

import pytest

from mcckd_jax.cli import demo_data as cli
from mcckd_jax.data import records
from mcckd_jax.data.tokenization import load_tokenizer
from mcckd_jax.demo import tokenizer

SMALL = ["--train", "120", "--dev", "20", "--test", "30", "--seed", "2"]


def _contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_writes_the_splits_and_the_tokenizer_and_prints_one_paragraph(tmp_path, capsys):
    assert cli.main([str(tmp_path / "out")] + SMALL) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1
    assert "120 training questions" in summary and "960 teacher-style rationales" in summary
    assert "20 dev and 30 test questions" in summary and "mcckd-prepare" in summary
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", "test.json", "tokenizer",
                                                     "train.json"]
    train = records.read_records(out / "train.json", require_rationales=True, task="gsm8k")
    assert len(train.records) == 120 and all(len(r.rationales) == 8 for r in train.records)
    dev, test = (records.read_records(out / f"{s}.json", task="gsm8k").records
                 for s in ("dev", "test"))
    assert (len(dev), len(test)) == (20, 30)
    assert not {r.question for r in train.records} & {r.question for r in test}
    assert json.loads((out / "train.json").read_text())[0].keys() == {"instruction", "output",
                                                                      "label"}
    loaded = load_tokenizer(out / "tokenizer")
    assert len(loaded) <= tokenizer.DEFAULT_VOCAB_SIZE and loaded.pad_token == "<pad>"


def test_same_seed_same_bytes_and_a_rerun_replaces_everything(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main([str(first)] + SMALL) == 0
    assert cli.main([str(second)] + SMALL) == 0
    assert _contents(first) == _contents(second)
    (second / "tokenizer" / "stale.txt").write_text("from an older run")
    assert cli.main([str(second), "--train", "50", "--dev", "5", "--test", "5"]) == 0
    capsys.readouterr()
    assert len(json.loads((second / "train.json").read_text())) == 50
    assert not (second / "tokenizer" / "stale.txt").exists()
    assert sorted(p.name for p in second.iterdir()) == ["dev.json", "test.json", "tokenizer",
                                                        "train.json"]


def test_a_failure_leaves_the_previous_files_and_no_temporary_folder(tmp_path, capsys,
                                                                      monkeypatch):
    out = tmp_path / "out"
    assert cli.main([str(out)] + SMALL) == 0
    before = _contents(out)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", fail)
    assert cli.main([str(out), "--train", "60", "--seed", "9"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "disk full" in captured.err
    assert _contents(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", "test.json", "tokenizer",
                                                     "train.json"]


@pytest.mark.parametrize("argv,expected", [(["--train", "-1"], "train must be >= 0"),
                                           (["--wrong_share", "1"], "wrong_share"),
                                           (["--vocab_size", "20"], "vocab_size"),
                                           (["--kinds", "shop,zoo"], "unknown kinds ['zoo']"),
                                           (["--max_quantity", "5"], "max_quantity")])
def test_bad_options_are_one_line_errors_and_write_nothing(tmp_path, capsys, argv, expected):
    assert cli.main([str(tmp_path / "out")] + argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and expected in captured.err
    assert not (tmp_path / "out").exists()


def test_kinds_option_restricts_the_stories(tmp_path, capsys):
    assert cli.main([str(tmp_path), "--train", "40", "--dev", "5", "--test", "5",
                     "--kinds", "shop,garden"]) == 0
    assert "story kinds over all splits: garden " in capsys.readouterr().out
    questions = [row["instruction"] for row in json.loads((tmp_path / "train.json").read_text())]
    assert all("dollars" in q or "garden" in q for q in questions)


def test_max_quantity_option_bounds_every_number_in_the_files(tmp_path, capsys):
    assert cli.main([str(tmp_path), "--train", "60", "--dev", "10", "--test", "10",
                     "--max_quantity", "25"]) == 0
    assert int(re.search(r"answers up to (\d+)", capsys.readouterr().out)[1]) <= 25
    texts = []
    for split in ("train", "dev", "test"):
        for row in json.loads((tmp_path / f"{split}.json").read_text()):
            outputs = row["output"] if isinstance(row["output"], list) else [row["output"]]
            texts += [row["instruction"], *outputs]
    assert max(int(x) for text in texts for x in re.findall(r"\d+", text)) <= 25


def test_whole_numbers_option_makes_small_numbers_single_tokens(tmp_path, capsys):
    assert cli.main([str(tmp_path), *SMALL, "--max_quantity", "25", "--whole_numbers"]) == 0
    loaded = load_tokenizer(tmp_path / cli.TOKENIZER_FOLDER)
    ids = loaded("So 9 + 3 = 12.", add_special_tokens=False)["input_ids"]
    assert "▁12" in loaded.convert_ids_to_tokens(ids)
    assert loaded.decode(ids) == "So 9 + 3 = 12."


def test_runs_as_a_program(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mcckd_jax.cli.demo_data", str(tmp_path),
                             "--train", "10", "--dev", "2", "--test", "2"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "10 training questions" in result.stdout
