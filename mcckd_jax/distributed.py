"""Joining a multi-process job: `jax.distributed.initialize()` when there is more than one
process, from the environment that the launch scripts (or the cluster) set."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize_from_environment() -> None:
    """Initializes JAX's distributed runtime when the job has several processes.

    Explicit: MCCKD_COORDINATOR (host:port), MCCKD_NUM_PROCESSES and MCCKD_PROCESS_ID, as
    launch/ sets them on GPU clusters or localhost. On TPU pods and SLURM jobs JAX finds these
    itself; set MCCKD_DISTRIBUTED=1 there. A single process does nothing.
    """
    num_processes = int(os.environ.get("MCCKD_NUM_PROCESSES", "1"))
    if num_processes > 1:
        # Collectives between CPU devices of several processes need gloo (the localhost
        # tests); the setting concerns CPU devices only. Asking for the backend here would
        # initialise it too early.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["MCCKD_COORDINATOR"],
                                   num_processes=num_processes,
                                   process_id=int(os.environ["MCCKD_PROCESS_ID"]))
    elif os.environ.get("MCCKD_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
