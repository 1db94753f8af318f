"""`initialize_from_environment`: nothing for one process; two processes on localhost join one
JAX runtime (2 CPU devices each) and run a collective across it."""

import json
import logging
import socket
import subprocess
import sys

import jax
import pytest

from cli_testing import environment
from mcckd_jax import distributed

# What each process runs: join, report what JAX sees, gather every process's index (a
# collective that needs both processes and the gloo CPU collectives).
CHILD = """
import json, logging
import numpy as np
import jax
from jax.experimental import multihost_utils
from mcckd_jax import distributed

logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
distributed.initialize_from_environment()
gathered = multihost_utils.process_allgather(np.int32(10 + jax.process_index()))
print("REPORT " + json.dumps({
    "process_index": jax.process_index(), "process_count": jax.process_count(),
    "local_devices": jax.local_device_count(), "devices": jax.device_count(),
    "device_processes": sorted(d.process_index for d in jax.devices()),
    "gathered": np.asarray(gathered).tolist()}), flush=True)
"""
VARIABLES = ("MCCKD_NUM_PROCESSES", "MCCKD_PROCESS_ID", "MCCKD_COORDINATOR", "MCCKD_DISTRIBUTED")


def test_a_single_process_does_nothing(monkeypatch, caplog):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    devices = jax.device_count()
    with caplog.at_level(logging.INFO, logger=distributed.__name__):
        distributed.initialize_from_environment()
        monkeypatch.setenv("MCCKD_NUM_PROCESSES", "1")  # explicit: still one process
        distributed.initialize_from_environment()
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and jax.process_index() == 0
    assert jax.device_count() == devices == 8  # conftest's forced CPU devices, untouched
    # The "process i of n" line belongs to multi-process jobs.
    assert [r for r in caplog.records if r.name == distributed.__name__] == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def reports(processes, timeout=120) -> list[tuple[dict, str]]:
    """(the REPORT line as a dict, the whole output) of each process; kills all of them when one
    fails or any is still running after `timeout` seconds (a coordinator that never answers)."""
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            assert process.returncode == 0, output[-3000:]
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    found = []
    for output in outputs:
        [line] = [line for line in output.splitlines() if line.startswith("REPORT ")]
        found.append((json.loads(line.removeprefix("REPORT ")), output))
    return found


def test_two_processes_on_localhost_join_one_runtime():
    port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=environment(devices=2, MCCKD_NUM_PROCESSES="2", MCCKD_PROCESS_ID=str(i),
                        MCCKD_COORDINATOR=f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for i, (report, output) in enumerate(reports(processes)):
        assert report == {"process_index": i, "process_count": 2, "local_devices": 2,
                          "devices": 4, "device_processes": [0, 0, 1, 1], "gathered": [10, 11]}
        assert f"LOG mcckd_jax.distributed process {i} of 2, 2 local / 4 global devices" in output


@pytest.mark.parametrize("variables", [{}, {"MCCKD_NUM_PROCESSES": "1"}])
def test_a_process_started_alone_stays_alone(variables):
    # The same child without a coordinator: it must neither wait for peers nor fail.
    env = {name: value for name, value in environment(devices=2).items()
           if name not in VARIABLES}
    [(report, output)] = reports([subprocess.Popen(
        [sys.executable, "-c", CHILD], env={**env, **variables},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)])
    assert report == {"process_index": 0, "process_count": 1, "local_devices": 2, "devices": 2,
                      "device_processes": [0, 0], "gathered": [10]}
    assert "LOG mcckd_jax.distributed" not in output
