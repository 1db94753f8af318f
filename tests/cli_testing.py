"""Running mcckd-train and mcckd-eval as separate processes from tests: the command of the
tiny LLaMA run on the prepared SVAMP sample (the `inputs` fixture of conftest.py), the
environment (forced CPU devices, the repository and the network guard on PYTHONPATH), and
what the tests read back (losses per step, damage to a checkpoint file)."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6  # of the default run; checkpoints every 2 steps


def train_command(inputs, output_dir, *extra):
    data, tokenizer = inputs
    return [sys.executable, "-m", "mcckd_jax.cli.train", str(REPO_ROOT / "configs" / "tiny.yaml"),
            f"data.train_files=[{data}]", f"data.tokenizer={tokenizer}",
            "student.architecture.vocab_size=1000", f"run.output_dir={output_dir}",
            f"run.steps={STEPS}", "run.checkpoint_every=2", "run.progress_bar=false",
            "run.async_checkpoints=false", *extra]


def environment(devices=8, **extra):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MCCKD_NUM_PROC")}
    return {**inherited, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
            # The repository, then what conftest put there (the network guard).
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            **extra}


def start(inputs, output_dir, *extra, env=None):
    return subprocess.Popen(train_command(inputs, output_dir, *extra), env=env or environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def losses(output_dir) -> dict[int, float]:
    """The loss of every step in metrics.jsonl (a resumed step: its latest record)."""
    lines = (pathlib.Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def losses_if_any(output_dir) -> dict[int, float]:
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    return losses(output_dir) if path.exists() else {}


def metrics_steps(output_dir) -> list[int]:
    lines = (pathlib.Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"condition not reached; output:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.2)


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
