"""mcckd-train end to end, as separate processes: resume after SIGTERM and after kill -9 gives
the losses of an uninterrupted run, a damaged checkpoint is skipped, and two processes of four
CPU devices reproduce one process of eight.

Real data: the SVAMP teacher sample from ../shared, prepared by mcckd-prepare's function, with
the test's own sentencepiece tokenizer and a tiny LLaMA trained from scratch.
"""

import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

import data_testing
from mcckd_jax.data import prepare, selection

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_inputs")
    prepare.prepare_files(shared_data / data_testing.SVAMP_SAMPLE, folder / "svamp.jsonl",
                          prepare.PrepareConfig(task="svamp",
                                                selection=selection.SelectionConfig(num_rationales=4)))
    tokenizer = data_testing._t5_tokenizer_dir(str(shared_data))
    return folder / "svamp.jsonl", tokenizer


def command(inputs, output_dir, *extra):
    data, tokenizer = inputs
    return [sys.executable, "-m", "mcckd_jax.cli.train", str(REPO_ROOT / "configs" / "tiny.yaml"),
            f"data.train_files=[{data}]", f"data.tokenizer={tokenizer}",
            "student.architecture.vocab_size=1000", f"run.output_dir={output_dir}",
            f"run.steps={STEPS}", "run.checkpoint_every=2", "run.progress_bar=false",
            "run.async_checkpoints=false", *extra]


def environment(devices=8, **extra):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MCCKD_NUM_PROC")}
    return {**inherited, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",  # the repository before conftest's network guard
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            **extra}


def start(inputs, output_dir, *extra, env=None):
    return subprocess.Popen(command(inputs, output_dir, *extra), env=env or environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def losses(output_dir) -> dict[int, float]:
    """The loss of every step in metrics.jsonl (a resumed step: its latest record)."""
    lines = (pathlib.Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"condition not reached; output:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(start(inputs, output_dir))
    result = losses(output_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return output_dir, result


@pytest.mark.slow
def test_sigterm_saves_and_the_restart_continues_with_identical_losses(inputs, uninterrupted,
                                                                       tmp_path):
    _, expected = uninterrupted
    process = start(inputs, tmp_path)
    wait_for(lambda: len(losses_if_any(tmp_path)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]  # stopped, not finished
    assert "stopped at step" in output
    stopped = max(losses(tmp_path))
    assert stopped < STEPS and (tmp_path / "checkpoints" / str(stopped)).is_dir()
    finish(start(inputs, tmp_path))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == expected  # every step, bit for bit


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_resumes_with_identical_losses(inputs, uninterrupted, tmp_path):
    _, expected = uninterrupted
    process = start(inputs, tmp_path)
    committed = tmp_path / "checkpoints" / "2" / "commit_success.txt"
    wait_for(committed.exists, process)
    process.kill()
    process.wait()
    finish(start(inputs, tmp_path))
    assert losses(tmp_path) == expected


def flip_bytes(item_dir: pathlib.Path) -> pathlib.Path:
    """XORs 400 bytes in the middle of the largest data file under `item_dir` (a bad disk or a
    torn copy: the file keeps its size); returns the file. Orbax's commit markers are not data:
    for the Grain item this picks the iterator state itself."""
    target = max((p for p in item_dir.rglob("*")
                  if p.is_file() and p.name != "commit_success.txt"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    for i in range(max(0, middle - 200), min(len(data), middle + 200)):
        data[i] ^= 0x5A
    target.write_bytes(bytes(data))
    return target


def metrics_steps(output_dir) -> list[int]:
    lines = (pathlib.Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("item", ["params", "optimizer", "data"])
def test_a_checkpoint_with_flipped_bytes_is_set_aside_and_training_resumes_from_the_previous_one(
        inputs, uninterrupted, tmp_path, item):
    source, expected = uninterrupted
    subprocess.run(["cp", "-r", str(source) + "/.", str(tmp_path)], check=True)
    damaged = flip_bytes(tmp_path / "checkpoints" / str(STEPS) / item)
    output = finish(start(inputs, tmp_path))
    [line] = [line for line in output.splitlines() if "is damaged" in line]
    assert f"checkpoint {STEPS} in" in line and f"resuming from checkpoint {STEPS - 2}" in line
    assert str(damaged.relative_to(tmp_path / "checkpoints" / str(STEPS))) in line
    assert "differs from its digest" in line
    assert losses(tmp_path) == expected
    # The replayed steps replace their first records: one line per step.
    assert metrics_steps(tmp_path) == list(range(1, STEPS + 1))
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == [
        str(STEPS)]


@pytest.mark.slow
def test_two_processes_of_four_devices_reproduce_one_process_of_eight(inputs, uninterrupted,
                                                                      tmp_path):
    _, expected = uninterrupted
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [
        start(inputs, tmp_path, "data.pipeline.batch_size=4", "mesh.across_hosts=[2,1,1]",
              env=environment(devices=4, MCCKD_NUM_PROCESSES="2", MCCKD_PROCESS_ID=str(i),
                              MCCKD_COORDINATOR=f"127.0.0.1:{port}"))
        for i in range(2)]
    for process in processes:
        finish(process)
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5)


def losses_if_any(output_dir) -> dict[int, float]:
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    return losses(output_dir) if path.exists() else {}


@pytest.mark.slow
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(inputs, uninterrupted,
                                                                     tmp_path):
    source, _ = uninterrupted
    subprocess.run(["cp", "-r", str(source) + "/.", str(tmp_path)], check=True)
    for step in (6, 4):  # keep checkpoint 2 only
        subprocess.run(["rm", "-r", str(tmp_path / "checkpoints" / str(step))], check=True)
    # Resumed at step 2 with a learning rate of 1e30, the weights overflow in step 3.
    process = start(inputs, tmp_path, "optimizer.learning_rate=1e30", "optimizer.warmup_steps=0")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output[-3000:]
    message = [line for line in output.splitlines() if line.startswith("mcckd-train:")]
    assert len(message) == 1, output[-3000:]
    assert message[0].startswith("mcckd-train: step 3: ")
    assert "not finite" in message[0] or "loss is nan" in message[0]
    assert "the last good checkpoint is step 2" in message[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


@pytest.mark.slow
def test_the_t5_student_trains_through_the_same_command(inputs, tmp_path):
    output = finish(start(inputs, tmp_path, "student.family=t5", "run.steps=3",
                          "data.pipeline.encoder_bucket_lengths=[64,128]"))
    assert "encoder_tokens" in output  # the compiled step saw the encoder-decoder batch
    result = losses(tmp_path)
    assert sorted(result) == [1, 2, 3]
    # T5's initialisation (unit-variance embeddings) starts far above ln(vocab); it must fall.
    assert all(map(math.isfinite, result.values())) and result[3] < result[1]


def test_length_drops_are_a_warning_with_counts_below_the_limit_and_an_error_above(caplog):
    from mcckd_jax.train import loop
    from mcckd_jax.train.config import DataConfig

    report = {"questions_in": 100, "rationales_in": 400,
              "length_drops": {"questions": 5, "rationales": 80}}  # 5% and 20%
    with caplog.at_level("WARNING", logger="mcckd_jax.train.loop"):
        loop._check_length_drops(report, DataConfig())
    [warning] = [r.getMessage() for r in caplog.records]
    assert "drop 5 of 100 questions (5%) and 80 of 400 rationales (20%)" in warning
    report["length_drops"]["rationales"] = 81
    with pytest.raises(ValueError, match=r"81 of 400 rationales \(20%\), more than "
                                         r"data.max_length_drop_fraction=0.2"):
        loop._check_length_drops(report, DataConfig())
    loop._check_length_drops(report, DataConfig(max_length_drop_fraction=0.25))  # allowed
