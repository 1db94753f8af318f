"""mcckd-plot: a valid PNG of the expected size from handwritten metrics; one-line errors."""

import json
import struct
import zlib

import pytest

pytest.importorskip("matplotlib")

from mcckd_jax.cli import plot as cli  # noqa: E402

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, checking the signature and the chunk's CRC (PNG
    specification, section 5), independently of matplotlib."""
    assert data[:8] == _PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(kind + body) == crc
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def _write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows))


def _run(tmp_path, with_eval=True):
    run = tmp_path / "run"
    _write_lines(run / "metrics.jsonl", [
        {"step": 1, "loss": 6.2, "ce": 6.0, "kl": 0.4, "learning_rate": 1e-4},
        {"step": 2, "loss": 3.1, "ce": 3.0, "kl": 0.2, "learning_rate": 2e-4},
        "",
        {"step": 3, "loss": 0.9, "ce": 0.8, "kl": 0.1, "learning_rate": 3e-4},
        {"step": 3, "loss": 0.7, "ce": 0.6, "kl": 0.1, "learning_rate": 3e-4},  # after a resume
    ])
    if with_eval:
        _write_lines(run / "eval" / "metrics.jsonl", [
            {"step": 0, "dataset": "test", "accuracy": 0.0},
            {"step": 2, "dataset": "test", "accuracy": 0.35},
            {"step": 3, "dataset": "dev", "accuracy": 0.5},
        ])
    return run


@pytest.mark.parametrize("with_eval", [True, False])
def test_writes_a_png_of_the_expected_size(tmp_path, capsys, with_eval):
    run = _run(tmp_path, with_eval)
    assert cli.main([str(run)]) == 0
    out = run / "metrics.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert _png_size(out.read_bytes()) == (1000, 750)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["metrics.jsonl", "metrics.png"] + (["eval"] if with_eval else []))


def test_curves_are_sorted_by_step_and_a_repeated_step_keeps_the_later_record(tmp_path):
    run = _run(tmp_path)
    curves = cli.train_curves(run / "metrics.jsonl")
    assert curves["loss"] == ([1, 2, 3], [6.2, 3.1, 0.7])
    assert curves["kl"] == ([1, 2, 3], [0.4, 0.2, 0.1])
    assert cli.eval_curves(run / "eval" / "metrics.jsonl") == {"dev": ([3], [0.5]),
                                                               "test": ([0, 2], [0.0, 0.35])}


def test_out_option_chooses_the_file(tmp_path, capsys):
    run = _run(tmp_path)
    assert cli.main([str(run), "--out", str(tmp_path / "plots" / "curves.png")]) == 0
    capsys.readouterr()
    assert _png_size((tmp_path / "plots" / "curves.png").read_bytes()) == (1000, 750)


@pytest.mark.parametrize("where,line,expected", [
    ("train", '{"step": 4, "loss": "low"}', "line 3, field 'loss': expected a number, got 'low'"),
    ("train", '{"loss": 1.0}', "line 3, field 'step': missing"),
    ("train", '{"step": 4, "loss": 1.0', "line 3: malformed JSON"),
    ("eval", '{"step": 4, "dataset": "test", "accuracy": null}',
     "line 3, field 'accuracy': expected a number, got None"),
    ("eval", '{"step": -1, "dataset": "test", "accuracy": 0.5}',
     "line 3, field 'step': expected a non-negative integer, got -1"),
])
def test_a_bad_line_is_one_line_on_stderr_naming_file_line_and_field(tmp_path, capsys, where,
                                                                     line, expected):
    run = _run(tmp_path)
    path = run / "metrics.jsonl" if where == "train" else run / "eval" / "metrics.jsonl"
    rows = path.read_text().splitlines()
    _write_lines(path, rows[:2] + [line] + rows[2:])
    assert cli.main([str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"{path}, {expected}" in captured.err
    assert not (run / "metrics.png").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_a_missing_metrics_file_is_a_one_line_error(tmp_path, capsys):
    assert cli.main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}: no such file" in capsys.readouterr().err


def test_several_runs_overlay_with_their_names(tmp_path, capsys):
    first = _run(tmp_path / "a")
    second = _run(tmp_path / "b", with_eval=False)
    (second / "dev_eval").mkdir()
    _write_lines(second / "dev_eval" / "metrics.jsonl",
                 [{"step": 2, "dataset": "dev", "accuracy": 0.25}])
    out = tmp_path / "both.png"
    assert cli.main([str(first), str(second), "--out", str(out)]) == 0
    capsys.readouterr()
    assert _png_size(out.read_bytes()) == (1000, 750)
    _, evals = cli.run_curves(second, "b")
    assert evals == {"b: dev (during training)": ([2], [0.25])}
    _, evals = cli.run_curves(first)
    assert set(evals) == {"dev", "test"}


def test_every_panel_names_its_y_axis_and_runs_with_one_name_are_told_apart(tmp_path):
    runs = [_run(tmp_path / "seed_0"), _run(tmp_path / "seed_1")]  # both end in "run"
    labels = cli.run_labels(runs)
    assert labels == ["seed_0/run", "seed_1/run"]
    train = {label: cli.run_curves(run, label)[0] for label, run in zip(labels, runs)}
    evals = {}
    for label, run in zip(labels, runs):
        evals.update(cli.run_curves(run, label)[1])
    drawing = cli.figure(train, evals, " vs ".join(labels))
    assert [axes.get_ylabel() for axes in drawing.axes] == [
        "CE + alpha * KL (nats)", "nats per rationale token", "nats per answer token",
        "accuracy (greedy, share of questions)"]
    legend = [text.get_text() for text in drawing.axes[0].get_legend().get_texts()]
    assert legend == labels


def test_the_panels_follow_the_table_of_loss_terms(tmp_path, monkeypatch):
    assert [field for field, _, _ in cli.TRAIN_PANELS] == ["loss", "ce", "kl"]
    # One more panel (a fourth training curve) adds a row: three rows of 375 pixels.
    monkeypatch.setattr(cli, "TRAIN_PANELS", cli.TRAIN_PANELS + (
        ("argmax_agreement", "argmax agreement", "share of answer tokens"),))
    run = _run(tmp_path)
    train, evals = cli.run_curves(run)
    drawing = cli.figure({"run": train}, evals, "run")
    assert [axes.get_ylabel() for axes in drawing.axes][3:] == [
        "share of answer tokens", "accuracy (greedy, share of questions)"]
    assert cli.main([str(run)]) == 0
    assert _png_size((run / "metrics.png").read_bytes()) == (1000, 1125)
