"""launch/: each script's dry mode prints the commands it would run, one shell line each, which
the tests read back with shlex (the arguments arrive intact: brackets, spaces, quotes); no dry run
calls gcloud, srun or curl. Beyond the printed text, tpu_pod.sh runs for real against a stand-in
gcloud whose two workers are folders (copy, unpack, install, run, logs back), and
local_processes.sh starts two real JAX processes that join one runtime."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

from cli_testing import REPO_ROOT, environment

LAUNCH = REPO_ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
TPU = ["--tpu", "my-tpu", "--zone", "us-central2-b"]
# What a user passes: a list override, a value with a space, one with a quote.
ARGS = ["configs/tiny.yaml", "data.train_files=[a.jsonl,b.jsonl]", "run.output_dir=runs/two words",
        "data.tokenizer=it's"]
TEACHER_ARGS = ["questions.jsonl", "--task", "gsm8k", "--num_samples", "8",
                "--output", "raw out.json", "--checkpoint", "/data/teacher", "local.batch_size=4"]
TOOLS = ("gcloud", "srun", "sbatch", "curl")  # what a dry run must never call


@pytest.fixture
def tripwire(tmp_path):
    """(PATH with stand-ins for TOOLS that record being called, the record file)."""
    folder, record = tmp_path / "tripwire", tmp_path / "called.txt"
    folder.mkdir()
    for tool in TOOLS:
        (folder / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{record}"\nexit 99\n')
        (folder / tool).chmod(0o755)
    yield f"{folder}{os.pathsep}{os.environ['PATH']}"
    assert not record.exists(), record.read_text()


def clean_environment(**extra):
    """This process's environment without the variables the scripts read, plus `extra`."""
    kept = {k: v for k, v in os.environ.items()
            if not k.startswith(("MCCKD_", "SLURM_", "JAX_", "TPU_", "XLA_"))
            and k not in ("NUM_NODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**kept, **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(name, *args, path, cwd, **variables):
    return subprocess.run(["bash", str(LAUNCH / name), *args], cwd=cwd, text=True,
                          capture_output=True, timeout=60,
                          env=clean_environment(PATH=path, **variables))


def dry(name, *args, path, cwd, **variables):
    """The command lines a dry run prints, each split into words as a shell would."""
    result = launch(name, *args, path=path, cwd=cwd, MCCKD_DRY_RUN="1", **variables)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    return [shlex.split(line[2:]) for line in lines]


def usage_error(name, *args, path, cwd, **variables) -> str:
    result = launch(name, *args, path=path, cwd=cwd, MCCKD_DRY_RUN="1", **variables)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{name}: ") and "usage: " in line
    return line


def option(words, flag):
    return words[words.index(flag) + 1]


# --- every script ------------------------------------------------------------------------------

def test_the_scripts_were_found():
    assert {p.name for p in SCRIPTS} >= {
        "lib.sh", "tpu_pod.sh", "tpu_worker.sh", "slurm_gpu.sbatch", "gpu_multihost.sh",
        "local_processes.sh", "demo.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_accepts_the_script(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- tpu_pod.sh and tpu_worker.sh --------------------------------------------------------------

def remote_command(words):
    return shlex.split(option(words, "--command"))


def check_gcloud(words, verb, *flags):
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]
    assert option(words, "--zone") == "us-central2-b" and "--worker=all" in words
    for flag, value in flags:
        assert option(words, flag) == value


def test_tpu_pod_prints_each_step_with_the_arguments_intact(tripwire, tmp_path):
    logs = tmp_path / "logs" / "run1"
    [mkdir, pack, copy, setup, run, collect] = dry(
        "tpu_pod.sh", *TPU, "--project", "my-project", "--dry_run", "--logs_dir", str(logs),
        "mcckd-train", *ARGS, path=tripwire, cwd=tmp_path)
    assert not logs.parent.exists()  # a dry run creates nothing
    assert mkdir == ["mkdir", "-p", str(logs)]
    archive = str(logs / "mcckd_jax.tar.gz")
    assert pack == ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others",
                    "--exclude-standard", "--exclude=/launch_logs/", "|", "tar", "-czf", archive,
                    "-C", str(REPO_ROOT), "--null", "-T", "-"]
    check_gcloud(copy, "scp", ("--project", "my-project"))
    assert copy[5:7] == [archive, "my-tpu:mcckd_jax.tar.gz"]
    check_gcloud(setup, "ssh", ("--project", "my-project"))
    assert setup[5] == "my-tpu"
    assert remote_command(setup) == [
        "mkdir", "-p", "mcckd_jax", "&&", "tar", "-xzf", "mcckd_jax.tar.gz", "-C", "mcckd_jax",
        "&&", "rm", "mcckd_jax.tar.gz", "&&", "cd", "mcckd_jax", "&&", "python3", "-m", "venv",
        ".venv", "&&", ".venv/bin/pip", "install", "--quiet", "--upgrade", "pip",
        "&&", ".venv/bin/pip", "install", "--quiet", "-e", ".[tpu]"]
    check_gcloud(run, "ssh", ("--project", "my-project"))
    assert run[5] == "my-tpu"
    assert remote_command(run) == ["cd", "mcckd_jax", "&&", "bash", "launch/tpu_worker.sh",
                                   "--log_dir", "launch_logs/run1", "mcckd-train", *ARGS]
    check_gcloud(collect, "scp", ("--project", "my-project"))
    assert collect[5:8] == ["--recurse", "my-tpu:mcckd_jax/launch_logs/run1", str(logs.parent)]


def test_tpu_pod_teacher_gets_no_mesh_override_and_the_flags_change_the_setup(tripwire, tmp_path):
    lines = dry("tpu_pod.sh", *TPU, "--dry_run", "--logs_dir=logs/t", "--install_extras",
                "tpu,torch-checkpoints", "--python", "python3.11", "mcckd-teacher", *TEACHER_ARGS,
                path=tripwire, cwd=tmp_path)
    assert not any("mesh" in word for words in lines for word in words)
    setup, run = remote_command(lines[3]), remote_command(lines[4])
    assert setup[-1] == ".[tpu,torch-checkpoints]" and "python3.11" in setup
    assert run[-len(TEACHER_ARGS) - 1:] == ["mcckd-teacher", *TEACHER_ARGS]
    assert "--project" not in lines[2]

    lines = dry("tpu_pod.sh", *TPU, "--skip_install", "--logs_dir", "logs/t", "mcckd-eval",
                "runs/x", path=tripwire, cwd=tmp_path)
    assert "pip" not in lines[3][-1] and "tar -xzf" in lines[3][-1]
    eval_args = ["mcckd-eval", "runs/x", "--test", "gsm8k=test set.jsonl"]
    lines = dry("tpu_pod.sh", *TPU, "--dry_run", "--skip_copy", "--logs_dir", "logs/t",
                *eval_args, path=tripwire, cwd=tmp_path)
    assert [words[5] for words in lines[1:]] == ["my-tpu", "--recurse"]
    assert remote_command(lines[1])[-4:] == eval_args


def test_tpu_pod_logs_go_to_a_dated_folder_by_default(tripwire, tmp_path):
    lines = dry("tpu_pod.sh", *TPU, "--dry_run", "mcckd-train", *ARGS, path=tripwire, cwd=tmp_path)
    logs = lines[0][-1]
    assert re.fullmatch(r"launch_logs/\d{8}-\d{6}", logs)
    assert lines[-1][6:8] == [f"my-tpu:mcckd_jax/{logs}", "launch_logs"]


@pytest.mark.parametrize("args, problem", [
    (["--zone", "z", "mcckd-train", "c.yaml"], "--tpu is required"),
    (["--tpu", "t", "mcckd-train", "c.yaml"], "--zone is required"),
    (TPU, "COMMAND is missing"),
    ([*TPU, "--logs_dir"], "--logs_dir needs a value"),
    ([*TPU, "--worker", "3", "mcckd-train"], "unknown flag --worker"),
    ([*TPU, "mcckd-plan", "c.yaml"], "COMMAND must be mcckd-train, mcckd-eval or mcckd-teacher"),
])
def test_tpu_pod_usage_errors(tripwire, tmp_path, args, problem):
    assert problem in usage_error("tpu_pod.sh", *args, path=tripwire, cwd=tmp_path)


def test_tpu_worker_sets_distributed_and_names_the_log_by_worker(tripwire, tmp_path):
    [words] = dry("tpu_worker.sh", "--log_dir", "launch_logs/a run", "mcckd-eval", "runs/x",
                  "--test", "gsm8k=test set.jsonl", path=tripwire, cwd=tmp_path, TPU_WORKER_ID="3")
    assert words == ["env", "MCCKD_DISTRIBUTED=1", "mcckd-eval", "runs/x", "--test",
                     "gsm8k=test set.jsonl", "2>&1", "|", "tee", "launch_logs/a run/worker-3.log"]
    [words] = dry("tpu_worker.sh", "mcckd-train", *ARGS, path=tripwire, cwd=tmp_path)
    assert words == ["env", "MCCKD_DISTRIBUTED=1", "mcckd-train", *ARGS]
    # Outside a TPU VM (and in any dry run) the log is named by host; the metadata server is not
    # asked (curl is on the tripwire).
    [words] = dry("tpu_worker.sh", "--log_dir", "logs", "mcckd-train", *ARGS, path=tripwire,
                  cwd=tmp_path)
    assert words[-1] == f"logs/worker-{socket.gethostname()}.log"
    assert "COMMAND is missing" in usage_error("tpu_worker.sh", "--log_dir", "x", path=tripwire,
                                               cwd=tmp_path)


# A stand-in for gcloud's `compute tpus tpu-vm scp|ssh ... --worker=all`: every folder in
# $FAKE_WORKERS is a worker's home; ssh runs the command there with bash, on all workers at once.
FAKE_GCLOUD = """
import json, os, pathlib, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
flags, positional, rest = {}, [], iter(args[4:])
for word in rest:
    if word.startswith("--"):
        name, equals, value = word.partition("=")
        flags[name] = value if equals or name not in ("--zone", "--command") else next(rest)
    else:
        positional.append(word)
assert flags["--worker"] == "all" and flags["--zone"] == "us-central2-b", args
workers = sorted(pathlib.Path(os.environ["FAKE_WORKERS"]).iterdir())
if args[3] == "ssh":
    assert positional == ["my-tpu"], args
    processes = [subprocess.Popen(["bash", "-c", flags["--command"]], cwd=home,
                                  env={**os.environ, "HOME": str(home), "TPU_WORKER_ID": str(i)})
                 for i, home in enumerate(workers)]
    sys.exit(max(process.wait() for process in processes))
*sources, destination = positional
for home in workers:
    for source in sources:
        if source.startswith("my-tpu:"):
            assert "--recurse" in flags, args
            folder = home / source.removeprefix("my-tpu:")
            shutil.copytree(folder, pathlib.Path(destination) / folder.name, dirs_exist_ok=True)
        else:
            shutil.copy(source, home / destination.removeprefix("my-tpu:"))
"""

# `python3 -m venv DIR` on a worker: a virtual environment whose pip records its arguments and
# "installs" the package by writing its console script, the stand-in mcckd-train.
FAKE_PYTHON3 = """#!/bin/sh
[ "$1 $2" = "-m venv" ] || { echo "python3 $*: not expected" >&2; exit 97; }
mkdir -p "$3/bin"
printf '%s\\n' '#!/bin/sh' 'echo "$PWD $*" >> "$FAKE_PIP_LOG"' \\
  'case "$*" in *"-e .[tpu]"*) cp "$FAKE_ENTRY_POINT" "$(dirname "$0")/mcckd-train" ;; esac' \\
  > "$3/bin/pip"
chmod +x "$3/bin/pip"
"""

FAKE_ENTRY_POINT = """
import json, os, sys
print("ENTRY " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                             "distributed": os.environ.get("MCCKD_DISTRIBUTED")}))
sys.exit(3 if os.environ["TPU_WORKER_ID"] == os.environ.get("FAKE_FAILING_WORKER") else 0)
"""


def executable(path, text):
    path.write_text(text if text.startswith("#!") else f"#!{sys.executable}\n{text}")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("failing_worker", [None, "1"])
def test_tpu_pod_copies_installs_runs_and_brings_the_logs_back(tmp_path, failing_worker):
    bin_dir, workers, logs = tmp_path / "bin", tmp_path / "workers", tmp_path / "logs" / "run1"
    bin_dir.mkdir()
    for i in range(2):
        (workers / f"host{i}").mkdir(parents=True)
    executable(bin_dir / "gcloud", FAKE_GCLOUD)
    executable(bin_dir / "python3", FAKE_PYTHON3)
    variables = dict(FAKE_WORKERS=str(workers), FAKE_GCLOUD_CALLS=str(tmp_path / "calls.jsonl"),
                     FAKE_PIP_LOG=str(tmp_path / "pip.log"),
                     FAKE_ENTRY_POINT=str(executable(tmp_path / "entry", FAKE_ENTRY_POINT)))
    if failing_worker:
        variables["FAKE_FAILING_WORKER"] = failing_worker
    result = launch("tpu_pod.sh", *TPU, "--logs_dir", str(logs), "mcckd-train", *ARGS,
                    path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", cwd=tmp_path, **variables)
    assert result.returncode == (3 if failing_worker else 0), result.stderr

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [call[3] for call in calls] == ["scp", "ssh", "ssh", "scp"]
    pip_calls = sorted((tmp_path / "pip.log").read_text().splitlines())
    for i in range(2):
        code = workers / f"host{i}" / "mcckd_jax"
        assert (code / "launch" / "tpu_worker.sh").is_file() and (code / "setup.cfg").is_file()
        assert not (workers / f"host{i}" / "mcckd_jax.tar.gz").exists()
        assert f"{code} install --quiet -e .[tpu]" in pip_calls
        log = (logs / f"worker-{i}.log").read_text()
        assert log.startswith("+ env MCCKD_DISTRIBUTED=1 mcckd-train configs/tiny.yaml")
        [entry] = [json.loads(line[6:]) for line in log.splitlines() if line.startswith("ENTRY ")]
        assert entry == {"argv": ARGS, "cwd": str(code), "distributed": "1"}
    assert sorted(p.name for p in logs.iterdir()) == ["mcckd_jax.tar.gz", "worker-0.log",
                                                      "worker-1.log"]


# --- slurm_gpu.sbatch --------------------------------------------------------------------------

SLURM = dict(SLURM_JOB_ID="7", SLURM_NNODES="4", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96")


def test_sbatch_header_asks_for_nodes_tasks_gpus_time_and_an_output_file():
    directives = re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$",
                            (LAUNCH / "slurm_gpu.sbatch").read_text(), flags=re.MULTILINE)
    assert {name for name, _ in directives} >= {"nodes", "ntasks-per-node", "gpus-per-node", "time",
                                                "output"}
    assert "%j" in dict(directives)["output"]


def test_sbatch_one_process_per_node_sees_all_its_gpus(tripwire, tmp_path):
    [words] = dry("slurm_gpu.sbatch", "mcckd-train", *ARGS, path=tripwire, cwd=tmp_path, **SLURM)
    assert words == ["env", "MCCKD_DISTRIBUTED=1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                     "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "srun", "--nodes=4", "--ntasks=4",
                     "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=96",
                     "mcckd-train", *ARGS, "mesh.across_hosts=[4,1,1]"]


def test_sbatch_one_process_per_gpu(tripwire, tmp_path):
    variables = {**SLURM, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8",
                 "MCCKD_PROCESS_PER": "gpu", "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
    [words] = dry("slurm_gpu.sbatch", "mcckd-eval", "runs/x", "--test", "gsm8k=test set.jsonl",
                  path=tripwire, cwd=tmp_path, **variables)
    assert words == ["env", "MCCKD_DISTRIBUTED=1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "srun",
                     "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                     "--cpus-per-task=12", "mcckd-eval", "runs/x", "--test", "gsm8k=test set.jsonl",
                     "mesh.across_hosts=[32,1,1]"]
    # The user's own split (FSDP over each node's 8 processes) stays the only one.
    [words] = dry("slurm_gpu.sbatch", "mcckd-train", *ARGS, "mesh.across_hosts=[4,8,1]",
                  path=tripwire, cwd=tmp_path, **variables)
    assert [w for w in words if w.startswith("mesh.")] == ["mesh.across_hosts=[4,8,1]"]


def test_sbatch_teacher_gets_no_mesh_override(tripwire, tmp_path):
    [words] = dry("slurm_gpu.sbatch", "mcckd-teacher", *TEACHER_ARGS, path=tripwire, cwd=tmp_path,
                  **SLURM)
    assert words[4:6] == ["srun", "--nodes=4"] and words[-len(TEACHER_ARGS) - 1:] == [
        "mcckd-teacher", *TEACHER_ARGS]


@pytest.mark.parametrize("args, variables, problem", [
    ([], SLURM, "COMMAND is missing"),
    (["mcckd-plan", "c.yaml"], SLURM, "COMMAND must be"),
    (["mcckd-train", "c.yaml"], {**SLURM, "SLURM_NNODES": ""}, "SLURM_NNODES is not set"),
    (["mcckd-train", "c.yaml"], {**SLURM, "SLURM_GPUS_ON_NODE": ""}, "GPUs per node are unknown"),
    (["mcckd-train", "c.yaml"], {**SLURM, "MCCKD_PROCESS_PER": "core"}, "node or gpu, not core"),
])
def test_sbatch_usage_errors(tripwire, tmp_path, args, variables, problem):
    assert problem in usage_error("slurm_gpu.sbatch", *args, path=tripwire, cwd=tmp_path,
                                  **variables)


# --- gpu_multihost.sh and local_processes.sh ---------------------------------------------------

HOST = dict(NUM_NODES="4", NODE_RANK="1", MASTER_ADDR="10.0.0.1")


def test_gpu_multihost_train_gets_the_mesh_override_and_teacher_none(tripwire, tmp_path):
    [words] = dry("gpu_multihost.sh", *ARGS, path=tripwire, cwd=tmp_path, **HOST)
    assert words == ["env", "MCCKD_NUM_PROCESSES=4", "MCCKD_PROCESS_ID=1",
                     "MCCKD_COORDINATOR=10.0.0.1:12355", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                     "mcckd-train", *ARGS, "mesh.across_hosts=[4,1,1]"]
    [words] = dry("gpu_multihost.sh", *TEACHER_ARGS, path=tripwire, cwd=tmp_path,
                  MCCKD_COMMAND="mcckd-teacher", MASTER_PORT="9999", **HOST)
    assert words[3] == "MCCKD_COORDINATOR=10.0.0.1:9999"
    assert words[5:] == ["mcckd-teacher", *TEACHER_ARGS]
    assert "MASTER_ADDR is not set" in usage_error(
        "gpu_multihost.sh", *ARGS, path=tripwire, cwd=tmp_path, NUM_NODES="4", NODE_RANK="0")


def test_local_processes_one_line_per_process(tripwire, tmp_path):
    lines = dry("local_processes.sh", "2", "4", *ARGS, path=tripwire, cwd=tmp_path,
                MCCKD_PORT="1234")
    assert lines == [["env", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
                      "JAX_PLATFORMS=cpu", "MCCKD_NUM_PROCESSES=2", f"MCCKD_PROCESS_ID={i}",
                      "MCCKD_COORDINATOR=127.0.0.1:1234", "mcckd-train", *ARGS,
                      "mesh.across_hosts=[2,1,1]", "&"] for i in range(2)]
    lines = dry("local_processes.sh", "2", "4", *TEACHER_ARGS, path=tripwire, cwd=tmp_path,
                MCCKD_COMMAND="mcckd-teacher")
    assert [words[6:] for words in lines] == [["mcckd-teacher", *TEACHER_ARGS, "&"]] * 2
    assert "PROCESSES must be a positive integer" in usage_error(
        "local_processes.sh", "two", "4", *ARGS, path=tripwire, cwd=tmp_path)


# The stand-in mcckd-train of the real run: joins the job as mcckd-train does, then gathers every
# process's index (a collective that needs both processes).
JOINING_ENTRY_POINT = """
import json, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from mcckd_jax import distributed

distributed.initialize_from_environment()
gathered = multihost_utils.process_allgather(np.int32(10 + jax.process_index()))
print("REPORT " + json.dumps({"argv": sys.argv[1:], "process_index": jax.process_index(),
    "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
    "gathered": np.asarray(gathered).tolist()}), flush=True)
"""


def test_local_processes_start_processes_that_join_one_runtime(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "mcckd-train", JOINING_ENTRY_POINT)
    variables = {k: v for k, v in environment().items() if not k.startswith("MCCKD_")}
    variables.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", MCCKD_PORT=str(free_port()))
    result = subprocess.run(["bash", str(LAUNCH / "local_processes.sh"), "2", "3", *ARGS],
                            cwd=tmp_path, env=variables, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = sorted((json.loads(line[7:]) for line in result.stdout.splitlines()
                      if line.startswith("REPORT ")), key=lambda report: report["process_index"])
    assert reports == [{"argv": [*ARGS, "mesh.across_hosts=[2,1,1]"], "process_index": i,
                        "process_count": 2, "local_devices": 3, "gathered": [10, 11]}
                       for i in range(2)]


def test_local_processes_exit_status_is_a_failing_process(tmp_path):
    command = executable(tmp_path / "exit_by_id",
                         '#!/bin/sh\n[ "$MCCKD_PROCESS_ID" = 1 ] && exit 3\nexit 0\n')
    result = subprocess.run(["bash", str(LAUNCH / "local_processes.sh"), "3", "1"], cwd=tmp_path,
                            env=clean_environment(MCCKD_COMMAND=str(command)), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3, result.stderr
