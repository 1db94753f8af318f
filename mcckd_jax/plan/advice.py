"""What to change when a plan does not fit: one knob at a time, in the order a user would try
them (split the weights over more devices, recompute more, accumulate gradients over
micro-batches, train LoRA adapters instead of every weight, halve the batch), each planned
again; the first setting that fits is the suggestion, with its numbers.

A knob is tried only where it changes something; a setting whose weights and optimizer state
alone exceed the memory is ruled out before anything is compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import logging
import math

import jax

from mcckd_jax import config as config_lib
from mcckd_jax import sharding
from mcckd_jax.plan import report
from mcckd_jax.train.config import TrainConfig

log = logging.getLogger(__name__)

LORA_OVERRIDES = ["student.lora.rank=16", "student.lora.alpha=32.0",
                  "student.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]


def knobs(config: TrainConfig, mesh: jax.sharding.Mesh, processes: int
          ) -> list[tuple[str, list[str]]]:
    """(what changes, the overrides that change it), in the order they are tried."""
    found = []
    data = sharding.pure_data_parallel_size(mesh)
    if data > 1:
        per_host = sharding.weights_split_over_batch_axes(config.mesh.per_host)
        found.append((f"fsdp over the {data} data-parallel devices too",
                      [f"mesh.per_host=[{','.join(map(str, per_host))}]"]))
    if config.student.remat_policy != "full":
        found.append(("recompute every block in the backward pass",
                      ["student.remat_policy=full"]))
    rows = config.data.pipeline.batch_size * processes
    for factor in (2, 4, 8):
        micro = config.run.micro_batches * factor
        if rows % micro == 0 and (rows // micro) % sharding.data_parallel_size(mesh) == 0:
            found.append((f"{micro} micro-batches (same batch, gradients accumulated)",
                          [f"run.micro_batches={micro}"]))
    if config.student.lora is None:
        found.append(("LoRA adapters (rank 16 on q/k/v/o) instead of every weight",
                      LORA_OVERRIDES))
    if config.data.pipeline.batch_size > 1:
        found.append(("half the batch", [f"data.pipeline.batch_size="
                                         f"{config.data.pipeline.batch_size // 2}"]))
    return found


def decoding_knobs(config: TrainConfig, mesh: jax.sharding.Mesh, processes: int
                   ) -> list[tuple[str, list[str]]]:
    """For the eval decoding program: weights split over "tensor" instead of gathered whole
    for every token (an fsdp mesh), then fewer prompts per batch. mcckd-eval takes these as
    overrides of the run's config."""
    found = []
    if sharding.is_model_parallel(mesh):
        grouped = math.prod(config.mesh.across_hosts)  # the config's per_host covers the rest
        tensor = sharding.tensor_parallel_per_host(mesh.size // grouped)
        found.append((f"decode with tensor parallelism (mcckd-eval ... mesh.per_host="
                      f"[{','.join(map(str, tensor))}])",
                      [f"mesh.per_host=[{','.join(map(str, tensor))}]"]))
    if config.dev_eval.batch_size > 1:
        found.append(("half the decoding batch",
                      [f"dev_eval.batch_size={config.dev_eval.batch_size // 2}"]))
    return found


def advise(setting: report.Setting, make_setting: Callable[[TrainConfig], report.Setting],
           failed: str = "train step") -> dict[str, Any] | None:
    """The first knob whose setting fits: {"change", "overrides", "plan"}; None if none does
    alone (then the knobs are combined in order, and the combination is returned if it fits).
    `failed` is the program that did not fit ("train step" or "decoding"); the decoding is
    planned again only for its own knobs."""
    decoding = failed == "decoding"
    tried = (decoding_knobs if decoding else knobs)(setting.config, setting.mesh,
                                                    setting.processes)
    for change, overrides in tried:
        candidate = _plan_with(setting.config, overrides, make_setting, decoding)
        if candidate is not None and candidate["fits"]:
            return {"change": change, "overrides": overrides, "plan": candidate}
    combined: list[str] = []
    for _, overrides in tried:
        combined += overrides
        candidate = _plan_with(setting.config, combined, make_setting, decoding)
        if candidate is not None and candidate["fits"]:
            return {"change": "all of: " + "; ".join(change for change, _ in tried),
                    "overrides": list(combined), "plan": candidate}
    return None


def _plan_with(config: TrainConfig, overrides: list[str], make_setting, decoding: bool
               ) -> dict | None:
    try:
        changed = make_setting(config_lib.apply_overrides(config, overrides))
        return report.plan(changed, decoding=decoding)
    except Exception as error:  # the knob does not apply here (a mesh, a split that fails)
        log.info("%s: does not apply (%s)", " ".join(overrides), error)
        return None
