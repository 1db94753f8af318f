"""mcckd-prepare on the command line: summary on success, one-line errors, nothing half-written."""

import json
import subprocess
import sys

import pytest

from data_testing import REPO_ROOT, SVAMP_SAMPLE
from mcckd_jax.cli import prepare as cli


def test_prepares_the_svamp_sample_with_the_chosen_options(shared_data, tmp_path, capsys):
    output = tmp_path / "svamp.jsonl"
    status = cli.main([str(shared_data / SVAMP_SAMPLE), "--task", "svamp", "--output", str(output),
                      "--num_rationales", "2", "--ngram", "2", "--policy", "random", "--seed", "7",
                      "--report", str(tmp_path / "report.json")])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "report.json").read_text())
    assert summary == {key: report[key] for key in summary}
    assert summary["duplicate_questions_merged"] == 0
    assert summary["questions_with_conflicting_labels"] == 0
    assert report["selection"]["num_rationales"] == 2 and report["selection"]["ngram"] == 2
    assert report["selection"]["policy"] == "random" and report["selection"]["seed"] == 7
    lines = output.read_text().splitlines()
    assert len(lines) == report["questions_out"]
    assert all(1 <= len(json.loads(line)["rationales"]) <= 2 for line in lines)


@pytest.mark.parametrize("content,expected", [
    ('[{"instruction": "Q", "output": ["2 = 2"], "label": "2"}', "malformed JSON at line 1"),
    ('[{"instruction": "Q", "label": "2"}]', "record 0, field 'output': empty rationale list"),
    ('[{"instruction": "Q", "output": "2", "label": ["2"]}]', "record 0, field 'label'"),
    ('[{"instruction": "Q", "output": [2], "label": "2"}]', "record 0, field 'output[0]'"),
    ("[]", "raw.json: no records"),
    (b'[{"instruction": "Caf\xe9?", "output": "2", "label": "2"}]',
     "raw.json: not valid UTF-8: byte 0xe9 at line 1 column 22 (byte offset 21)"),
])
def test_bad_input_is_one_line_on_stderr_and_writes_nothing(tmp_path, capsys, content, expected):
    source = tmp_path / "raw.json"
    source.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    output = tmp_path / "out.jsonl"
    status = cli.main([str(source), "--task", "gsm8k", "--output", str(output)])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.count("\n") == 1
    assert str(source) in captured.err and expected in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.json"]


def test_skip_bad_records_counts_them(tmp_path, capsys):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([{"instruction": "Q", "output": ["1 + 1 = 2."], "label": "2"},
                                  {"instruction": "Q", "output": [], "label": "2"}]))
    output = tmp_path / "out.jsonl"
    assert cli.main([str(source), "--task", "gsm8k", "--output", str(output),
                     "--skip_bad_records"]) == 0
    assert json.loads(capsys.readouterr().out)["bad_records_skipped"] == 1
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["bad_records_skipped"] == 1 and report["questions_out"] == 1


def test_summary_counts_repeated_and_conflicting_questions(tmp_path, capsys):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([
        {"instruction": "Q: 1 + 1?", "output": ["1 + 1 = 2."], "label": "2"},
        {"instruction": "Q:  1 + 1?", "output": ["One and one make 2."], "label": "2"},
        {"instruction": "Q: 1 + 1?", "output": ["It is 3."], "label": "3"},
    ]))
    assert cli.main([str(source), "--task", "gsm8k", "--output", str(tmp_path / "o.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["questions_in"] == 3 and summary["questions_out"] == 2
    assert summary["duplicate_questions_merged"] == 1
    assert summary["questions_with_conflicting_labels"] == 1


def test_unwritable_report_is_one_line_and_writes_neither_file(tmp_path, capsys):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([{"instruction": "Q", "output": ["1 + 1 = 2."], "label": "2"}]))
    (tmp_path / "runs").write_text("a file, not a folder")
    report = tmp_path / "runs" / "report.json"
    status = cli.main([str(source), "--task", "gsm8k", "--output", str(tmp_path / "out.jsonl"),
                       "--report", str(report)])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err == (f"mcckd-prepare: error: cannot write {report}: folder "
                            f"{tmp_path / 'runs'} cannot be created: {tmp_path / 'runs'} is a "
                            "file\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.json", "runs"]


def test_entry_point_runs_as_a_program_and_rejects_unknown_tasks(tmp_path):
    source = tmp_path / "raw.json"
    source.write_text("[]")
    result = subprocess.run([sys.executable, "-m", "mcckd_jax.cli.prepare", str(source),
                             "--task", "algebra", "--output", str(tmp_path / "out.jsonl")],
                            capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert result.returncode == 2
    assert result.stderr == ("mcckd-prepare: error: unknown task 'algebra'; expected one of "
                             "gsm8k, svamp, asdiv, multiarith, csqa, strategyqa\n")
    assert not (tmp_path / "out.jsonl").exists()
