"""Orbax checkpoints of the train state and the Grain iterator, in <output_dir>/checkpoints.

Items of one checkpoint: `params` (trainable variables), `model_state` (the rest of the model:
frozen base weights under LoRA, RNG streams), `optimizer` (step and optimizer state) and
`data` (the Grain iterator). The eval binary restores the first two only.

Every checkpoint carries the SHA-256 of each of its item files (`digests`), written before
Orbax commits it. Nothing is restored from a checkpoint that fails that check: training sets
it aside and resumes from the newest one that passes; evaluation skips it. A checkpoint that
passes but does not fit the state (a changed model or optimizer config) is an error, never a
silent fresh start.
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
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from mcckd_jax import sharding
from mcckd_jax.train import digests
from mcckd_jax.train.state import TrainState

log = logging.getLogger(__name__)

# Orbax writes step N into "N.orbax-checkpoint-tmp" and renames it when committing (on file
# systems with atomic rename); the digests go into that folder, before the rename.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match their digests (or that has none)."""


class IncompatibleCheckpoint(ValueError):
    """A verified checkpoint that does not restore into the state it is asked for."""


def verification_problem(directory: pathlib.Path, step: int) -> str | None:
    """Why checkpoint `step` in `directory` fails its digests, or None; process 0 reads the
    files and every process gets its verdict."""
    problem = digests.problem(directory / str(step)) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        intact = multihost_utils.broadcast_one_to_all(np.int32(problem is None))
        if problem is None and not int(intact):
            problem = "process 0 found its files damaged"
    return problem


def _path_name(path) -> str:
    return "/".join(str(next(getattr(key, attr) for attr in ("key", "name", "idx")
                             if hasattr(key, attr))) for key in path)


def _signatures(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{leaf path: (shape, dtype)} as Orbax stores the leaves (typed PRNG keys as their data)."""
    def signature(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(leaf.shape), str(np.dtype(leaf.dtype))
    return {_path_name(path): signature(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _misfit(stored_metadata, template) -> str | None:
    """How the arrays a checkpoint item stores differ from `template` (None: they fit). Checked
    before restoring: a failed Orbax restore leaves its reads running into interpreter exit."""
    stored = _signatures(getattr(stored_metadata, "tree", stored_metadata))
    wanted = _signatures(template)
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or extra:
        return f"missing {missing[:3]}, unexpected {extra[:3]}"
    differ = [f"{name} {stored[name]} != {wanted[name]}" for name in sorted(wanted)
              if stored[name] != wanted[name]]
    return f"shape/dtype of {differ[0]}" + (f" (and {len(differ) - 1} more)" if len(differ) > 1
                                            else "") if differ else None


def _check_fits(directory: pathlib.Path, step: int, templates: Mapping[str, Any],
                where: str, hint: str = "") -> None:
    """Raises IncompatibleCheckpoint when an item of checkpoint `step` does not fit its
    template (from the item's metadata; no array is read)."""
    for item, template in templates.items():
        if not jax.tree.leaves(template):
            continue
        item_dir = directory / str(step) / item
        problem = ("the checkpoint does not have it" if not item_dir.is_dir() else
                   _misfit(ocp.StandardCheckpointHandler().metadata(item_dir), template))
        if problem is not None:
            raise IncompatibleCheckpoint(
                f"checkpoint {step} in {directory} is intact (digests verified) but does not fit "
                f"{where}: {item}: {problem}{hint}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class Checkpointer:
    """Periodic saves that keep the last `keep`, and with `best_metric` also the `keep_best`
    checkpoints whose saved metrics rank best by it. Saves run in the background unless
    `async_save` is off; either way each one is sealed with its digests before it commits."""

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
        # Orbax runs the post-finalization callback only with its asynchronous checkpointer;
        # a synchronous save is an asynchronous one waited for.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            preservation_policy=preservation.AnyPreservationPolicy(policies))
        self.async_save = async_save
        self._saving: int | None = None
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _seal(self) -> None:
        """Orbax's callback on the primary process, once every file of the save in flight is
        written and before the step folder is committed."""
        staged = self.directory / f"{self._saving}{_ORBAX_TMP_SUFFIX}"
        digests.seal(staged if staged.is_dir() else self.directory / str(self._saving))

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
        self.manager.wait_until_finished()  # the previous save is sealed before _saving moves
        self._saving = step
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                                  metrics=dict(metrics) if metrics else None)
        if saved and not self.async_save:
            self.manager.wait_until_finished()
        return saved

    def _restore_items(self, state: TrainState, shardings: TrainState, data_iterator) -> dict:
        def target(tree, tree_shardings):
            return ocp.args.StandardRestore(sharding.abstract_with_shardings(tree, tree_shardings))

        items = dict(
            params=target(state.params, shardings.params),
            optimizer=target({"step": state.step, "opt_state": state.opt_state},
                             {"step": shardings.step, "opt_state": shardings.opt_state}),
            data=grain.checkpoint.CheckpointRestore(data_iterator))
        if jax.tree.leaves(state.model_state):
            items["model_state"] = target(state.model_state, shardings.model_state)
        return items

    def restore_latest(self, state: TrainState, shardings: TrainState,
                       data_iterator) -> TrainState | None:
        """The newest verified checkpoint, into `state`'s structure and `shardings`; the
        iterator is moved to its saved position. None when there is none. Checkpoints newer
        than it that fail verification are set aside.

        Raises:
          IncompatibleCheckpoint: the newest verified checkpoint does not fit `state`.
        """
        damaged: dict[int, str] = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = verification_problem(self.directory, step)
            if problem is not None:
                damaged[step] = problem
                continue
            self._set_aside(damaged, f"resuming from checkpoint {step}, the newest verified one")
            _check_fits(self.directory, step, {
                "params": state.params, "model_state": state.model_state,
                "optimizer": {"step": state.step, "opt_state": state.opt_state}},
                "this run's state", hint="; was the student, LoRA or optimizer config changed? "
                "Use a new run.output_dir")
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(**self._restore_items(state, shardings,
                                                                        data_iterator)))
            except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
                raise IncompatibleCheckpoint(
                    f"checkpoint {step} in {self.directory} is intact (digests verified) but "
                    f"does not restore into this run's state ({_first_line(error)}); was the "
                    "student, LoRA or optimizer config changed? Use a new run.output_dir"
                ) from error
            log.info("resumed from checkpoint %d in %s (digests verified)", step, self.directory)
            return TrainState(step=restored.optimizer["step"], params=restored.params,
                              model_state=restored.get("model_state", state.model_state),
                              opt_state=restored.optimizer["opt_state"])
        self._set_aside(damaged, "no verified checkpoint is left: starting from step 0")
        return None

    def _set_aside(self, damaged: Mapping[int, str], outcome: str) -> None:
        """Moves damaged checkpoints out of the way (kept for inspection) so that the resumed
        run can save those steps again; one warning line per checkpoint says why and what
        the run does instead."""
        if not damaged:
            return
        if jax.process_index() == 0:
            aside = self.directory.parent / "damaged_checkpoints"
            aside.mkdir(exist_ok=True)
            for step, problem in damaged.items():
                target = aside / f"{step}-{time.time_ns()}"
                (self.directory / str(step)).rename(target)
                log.warning("checkpoint %d in %s is damaged (%s); moved to %s; %s", step,
                            self.directory, problem, target, outcome)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mcckd_jax: damaged checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_params(output_dir: str | pathlib.Path, params_template: Any,
                   model_state_template: Any, step: int | None = None) -> tuple[int, Any, Any]:
    """(step, params, model_state) of a verified checkpoint, without the optimizer or data
    state; the templates give structure and target shardings.

    With `step` None, the newest checkpoint that passes verification (the damaged ones newer
    than it are named in a warning and left where they are: evaluation never moves a run's
    files).

    Raises:
      FileNotFoundError: no checkpoint (or no checkpoint `step`).
      DamagedCheckpoint: checkpoint `step` fails verification, or every checkpoint does.
      IncompatibleCheckpoint: it does not fit the templates.
    """
    directory = pathlib.Path(output_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoint")
    with ocp.CheckpointManager(directory) as manager:
        available = sorted(manager.all_steps(), reverse=True)
        if not available:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        if step is not None and step not in available:
            raise FileNotFoundError(f"{directory}: no checkpoint {step} (there are "
                                    f"{', '.join(map(str, sorted(available)))})")
        damaged: dict[int, str] = {}
        for candidate in available if step is None else [step]:
            problem = verification_problem(directory, candidate)
            if problem is None:
                break
            if step is not None:
                raise DamagedCheckpoint(f"checkpoint {step} in {directory} is damaged: {problem}")
            damaged[candidate] = problem
        else:
            raise DamagedCheckpoint(f"{directory}: no checkpoint passes verification "
                                    f"(checkpoint {available[0]}: {damaged[available[0]]})")
        for bad, problem in damaged.items():
            log.warning("checkpoint %d in %s is damaged (%s); evaluating checkpoint %d, the "
                        "newest verified one", bad, directory, problem, candidate)
        _check_fits(directory, candidate, {"params": params_template,
                                         "model_state": model_state_template},
                    "the student of this config")
        items = dict(params=ocp.args.StandardRestore(
            sharding.abstract_with_shardings(params_template)))
        if jax.tree.leaves(model_state_template):
            items["model_state"] = ocp.args.StandardRestore(
                sharding.abstract_with_shardings(model_state_template))
        try:
            restored = manager.restore(candidate, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
            raise IncompatibleCheckpoint(
                f"checkpoint {candidate} in {directory} is intact (digests verified) but does "
                f"not restore into the student of this config ({_first_line(error)})") from error
    return candidate, restored.params, restored.get("model_state", model_state_template)
