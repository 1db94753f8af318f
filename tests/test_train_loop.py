"""mcckd-train end to end, as separate processes: resume after SIGTERM and after kill -9 gives
the losses of an uninterrupted run, a damaged checkpoint is skipped, and two processes of four
CPU devices reproduce one process of eight.

Real data: the SVAMP teacher sample from ../shared, prepared by mcckd-prepare's function, with
the test's own sentencepiece tokenizer and a tiny LLaMA trained from scratch.
"""

import json
import math
import signal
import socket
import subprocess

import pytest

from cli_testing import (STEPS, environment, finish, flip_bytes, losses, losses_if_any,
                         metrics_steps, start, wait_for)


@pytest.fixture(scope="module")
def uninterrupted_with_output(inputs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    output = finish(start(inputs, output_dir))
    result = losses(output_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return output_dir, result, output


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_with_output):
    output_dir, result, _ = uninterrupted_with_output
    return output_dir, result


@pytest.mark.slow
def test_the_default_output_is_what_a_user_acts_on(uninterrupted_with_output):
    output_dir, _, output = uninterrupted_with_output
    # Orbax's INFO lines (a hundred per short run), JAX's backend probing and the compiled
    # memory report belong to --log_level INFO; warnings and the closing line stay.
    for noise in (" INFO ", "absl", "Unable to initialize backend", "compiled step"):
        assert noise not in output, output[-3000:]
    assert "WARNING mcckd_jax.data.run_inputs: the length limits" in output
    assert output.strip().splitlines()[-1] == (
        f"trained to step {STEPS}: checkpoints in {output_dir}/checkpoints, metrics in "
        f"{output_dir}/metrics.jsonl")


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
def test_the_t5_student_trains_through_the_same_command(t5_run):
    output_dir, output = t5_run
    assert "encoder_tokens" in output  # the compiled step saw the encoder-decoder batch
    result = losses(output_dir)
    assert sorted(result) == [1, 2, 3]
    # T5's initialisation (unit-variance embeddings) starts far above ln(vocab); it must fall.
    assert all(map(math.isfinite, result.values())) and result[3] < result[1]


@pytest.mark.slow
def test_packed_rows_resume_mid_epoch_with_the_uninterrupted_losses(inputs, uninterrupted,
                                                                    tmp_path_factory):
    # Two devices: each packs the sequences of its 4 questions (8 views) into its own rows.
    packed, env = ("data.pipeline.packing=true",), environment(devices=2)
    reference = tmp_path_factory.mktemp("packed_uninterrupted")
    finish(start(inputs, reference, *packed, env=env))
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    # The same examples as the unpacked run, so the same losses up to float32 summation order.
    unpacked_dir, unpacked = uninterrupted
    assert all(math.isclose(expected[s], unpacked[s], rel_tol=1e-4) for s in expected)
    share = [json.loads(line)["loss_share"]
             for line in (reference / "metrics.jsonl").read_text().splitlines()]
    unpacked_share = [json.loads(line)["loss_share"]
                      for line in (unpacked_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(share) / len(share) > 1.3 * sum(unpacked_share) / len(unpacked_share)

    interrupted = tmp_path_factory.mktemp("packed_interrupted")
    process = start(inputs, interrupted, *packed, env=env)
    wait_for((interrupted / "checkpoints" / "2" / "commit_success.txt").exists, process)
    process.kill()
    process.wait()
    finish(start(inputs, interrupted, *packed, env=env))
    assert losses(interrupted) == expected  # bit for bit
