"""MetricsLogger: one metrics.jsonl line per step across resumes, and TensorBoard told to drop
the replayed steps.

A resumed run starts from its newest checkpoint and replays the steps logged after it; the
lines those steps left behind (and a line a killed process left half-written) must go, so a
reader needs no dedupe. The TensorBoard check parses the event file's records by hand
(length-prefixed Event protos) and looks for the SessionLog.START that carries the purge step.
"""

import json
import struct

import pytest

from tensorboardX.proto import event_pb2

from mcckd_jax.train import metrics as train_metrics
from mcckd_jax.train.metrics import MetricsLogger


def log_steps(output_dir, steps, start_step=0, tensorboard=False):
    logger = MetricsLogger(output_dir, total_steps=10, start_step=start_step, progress_bar=False,
                           tensorboard=tensorboard)
    for step in steps:
        logger.log(step, {"loss": float(step), "param_norm": 1.0}, positions=100.0 * step,
                   loss_tokens=30.0 * step)
    logger.close()


def jsonl(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_keeps_one_line_per_step(tmp_path):
    log_steps(tmp_path, range(1, 6))
    with (tmp_path / "metrics.jsonl").open("a") as handle:  # killed while writing step 6
        handle.write('{"step": 6, "loss": 6.')
    log_steps(tmp_path, [4, 5, 6, 7], start_step=3)
    records = jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_evaluation_lines_of_replayed_steps_go_too(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=10, progress_bar=False, tensorboard=False)
    for step in (1, 2):
        logger.log(step, {"loss": 1.0}, positions=1.0, loss_tokens=1.0)
        logger.log_eval(step, {"dev_accuracy": 0.5})
    logger.close()
    log_steps(tmp_path, [2], start_step=1)
    assert [(r["step"], "dev_accuracy" in r) for r in jsonl(tmp_path)] == [
        (1, False), (1, True), (2, False)]


def event_records(path):
    data, events = path.read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        events.append(event_pb2.Event.FromString(data[12:12 + length]))
        data = data[12 + length + 4:]
    return events


def test_tensorboard_purges_the_replayed_steps(tmp_path):
    log_steps(tmp_path, [4, 5], start_step=3, tensorboard=True)
    [events_file] = (tmp_path / "tensorboard" / "train").iterdir()
    starts = [e.step for e in event_records(events_file)
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]


def test_positions_and_loss_tokens_per_second_share_one_clock(tmp_path):
    # 100 positions and 30 loss tokens per step: the two rates are in that ratio, whatever
    # the time between calls.
    log_steps(tmp_path, range(1, 4))
    for record in jsonl(tmp_path):
        assert record["positions_per_second"] > 0
        assert record["positions_per_second"] / record["loss_tokens_per_second"] == \
            pytest.approx(100 / 30)


def test_real_tokens_per_second_and_the_progress_bar(tmp_path):
    # Per step 100 positions (padding included), 80 real tokens, 30 of them loss tokens.
    logger = MetricsLogger(tmp_path, total_steps=10, progress_bar=False, tensorboard=False)
    values = {"loss": 1.5, "ce": 1.0, "kl": 0.5, "argmax_agreement": 0.25,
              "learning_rate": 1e-3}
    records = [logger.log(step, values, positions=100.0 * step, loss_tokens=30.0 * step,
                          real_tokens=80.0 * step) for step in range(1, 4)]
    logger.close()
    assert jsonl(tmp_path) == records
    for record in records:
        assert record["positions_per_second"] / record["real_tokens_per_second"] == \
            pytest.approx(100 / 80)
        assert record["real_tokens_per_second"] / record["loss_tokens_per_second"] == \
            pytest.approx(80 / 30)
    postfix = train_metrics._bar_postfix(records[-1])
    assert list(postfix) == ["loss", "ce", "kl", "learning_rate", "pos/s", "tok/s",
                             "loss tok/s"]
    assert postfix["ce"] == "1" and postfix["kl"] == "0.5"
