"""Orbax checkpoints of the train state and the Grain iterator, in <output_dir>/checkpoints.

Items of one checkpoint: "params" (trainable variables), "model_state" (the rest of the model:
frozen base weights under LoRA, RNG streams), "optimizer" (step and optimizer state) and
"data" (the Grain iterator). The eval binary restores the first two only. Saves run
asynchronously; a checkpoint that fails to restore is skipped for the one before it.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from mcckd_jax.train.state import TrainState

log = logging.getLogger(__name__)


def _abstract(tree, shardings=None):
    """ShapeDtypeStructs (with the target shardings) that tell Orbax where arrays go."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class Checkpointer:
    """Periodic, asynchronous saves that keep the last `keep`, and with `best_metric` also
    the `keep_best` checkpoints whose saved metrics rank best by it."""

    def __init__(self, output_dir: str | pathlib.Path, *, save_every: int, keep: int = 3,
                 async_save: bool = True, best_metric: str | None = None,
                 best_mode: str = "max", keep_best: int = 1):
        self.directory = pathlib.Path(output_dir).absolute() / "checkpoints"
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be min or max, got {best_mode!r}")
        policies = [preservation.LatestN(n=keep)]
        if best_metric is not None:
            worst = math.inf if best_mode == "min" else -math.inf  # saves without the metric
            policies.append(preservation.BestN(
                get_metric_fn=lambda metrics: metrics.get(best_metric, worst),
                reverse=best_mode == "min", n=keep_best))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, enable_async_checkpointing=async_save,
            preservation_policy=preservation.AnyPreservationPolicy(policies))
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: TrainState, data_iterator, *, force: bool = False,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Saves at state.step when it is due (or when forced); returns whether it saved."""
        step = int(jax.device_get(state.step))
        items = dict(
            params=ocp.args.StandardSave(state.params),
            optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            data=grain.checkpoint.CheckpointSave(data_iterator))
        if jax.tree.leaves(state.model_state):  # Orbax refuses empty items
            items["model_state"] = ocp.args.StandardSave(state.model_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                                 metrics=dict(metrics) if metrics else None)

    def restore_latest(self, state: TrainState, shardings: TrainState,
                       data_iterator) -> TrainState | None:
        """The newest checkpoint that restores, into `state`'s structure and `shardings`;
        the iterator is moved to its saved position. None when there is none."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = dict(
                params=ocp.args.StandardRestore(_abstract(state.params, shardings.params)),
                optimizer=ocp.args.StandardRestore(_abstract(
                    {"step": state.step, "opt_state": state.opt_state},
                    {"step": shardings.step, "opt_state": shardings.opt_state})),
                data=grain.checkpoint.CheckpointRestore(data_iterator))
            if jax.tree.leaves(state.model_state):
                items["model_state"] = ocp.args.StandardRestore(
                    _abstract(state.model_state, shardings.model_state))
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # a damaged checkpoint: try the one before it
                log.warning("checkpoint %d in %s does not restore (%s: %s); falling back to "
                            "the previous one", step, self.directory, type(error).__name__,
                            str(error).splitlines()[0] if str(error) else "")
                damaged.append(step)
                continue
            self._set_aside(damaged)
            log.info("resumed from checkpoint %d in %s", step, self.directory)
            return TrainState(step=restored.optimizer["step"], params=restored.params,
                              model_state=restored.get("model_state", state.model_state),
                              opt_state=restored.optimizer["opt_state"])
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged checkpoints out of the way (kept for inspection) so that the resumed
        run can save those steps again."""
        if not steps or jax.process_index() != 0:
            return
        aside = self.directory.parent / "damaged_checkpoints"
        aside.mkdir(exist_ok=True)
        for step in steps:
            (self.directory / str(step)).rename(aside / f"{step}-{time.time_ns()}")
            log.warning("moved damaged checkpoint %d to %s", step, aside)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_params(output_dir: str | pathlib.Path, params_template: Any,
                   model_state_template: Any, step: int | None = None) -> tuple[int, Any, Any]:
    """(step, params, model_state) of a checkpoint (default: the latest), without the
    optimizer or data state; the templates give structure and target shardings."""
    directory = pathlib.Path(output_dir).absolute() / "checkpoints"
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        items = dict(params=ocp.args.StandardRestore(_abstract(params_template)))
        if jax.tree.leaves(model_state_template):
            items["model_state"] = ocp.args.StandardRestore(_abstract(model_state_template))
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored.params, restored.get("model_state", model_state_template)
