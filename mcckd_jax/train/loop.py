"""The training loop: every side effect of a run (data, compilation, logging, checkpoints,
signals) lives here; the step itself is pure.

The step is jitted once with explicit shardings and donation, compiled ahead of time per
batch shape (the pipeline's few bucket lengths) with its memory analysis logged, and step n's
metrics are fetched only after step n+1 is dispatched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from mcckd_jax import config as config_lib
from mcckd_jax import files, host_memory, sharding
from mcckd_jax.data import pipeline, run_inputs, tokenization
from mcckd_jax.models import pretrained
from mcckd_jax.train import checkpointing, compilation, optimizer, state as train_state
from mcckd_jax.train import step as train_step
from mcckd_jax.train.config import TrainConfig
from mcckd_jax.train.dev_eval import DevEvaluator
from mcckd_jax.train.metrics import MetricsLogger

log = logging.getLogger(__name__)

STEP_FIELDS = ("tokens", "targets", "loss_mask", "rationale_mask", "span_positions", "span_mask",
               "segment_ids", "positions", "span_index", "prompt_segment_ids",
               "encoder_tokens", "encoder_mask")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclasses.dataclass
class _Preemption:
    """Set by SIGTERM; the loop saves a checkpoint and stops at the next step boundary."""

    signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __call__(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.signal = signum


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a call of `train` did: the metric records it logged, and the signal that stopped
    it before its last step (None when it ran to the end)."""

    records: list[dict]
    stopped_by_signal: int | None = None


def _step_batch(local: Mapping[str, np.ndarray], batch_sharding: jax.sharding.NamedSharding
                ) -> dict:
    """The global arrays the step takes, from this process's rows of a pipeline batch."""
    return sharding.global_batch({name: value for name, value in local.items()
                                  if name in STEP_FIELDS}, batch_sharding)


class _CompiledSteps:
    """One AOT-compiled executable per batch shape, with its memory analysis logged."""

    def __init__(self, jitted):
        self.jitted, self.executables = jitted, {}

    def __call__(self, state, batch):
        key = tuple(sorted((name, value.shape) for name, value in batch.items()))
        if key not in self.executables:
            compiled = compilation.compile_train_step(self.jitted, state, batch)
            memory = compilation.memory_summary(compiled)
            if memory is not None:
                log.info("compiled step for %s: %s", dict(key), compilation.describe_memory(memory))
            self.executables[key] = compiled
            host_memory.release_free_heap()  # the compiler's freed heap, before the step runs
        return self.executables[key](state, batch)


def _check_finite(step: int, metrics: Mapping[str, float], checkpointer) -> None:
    """Stops the run when step `step` produced a non-finite loss or non-finite weights."""
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["param_norm"]):
        return
    latest = checkpointer.manager.latest_step()
    where = (f"the last good checkpoint is step {latest} in {checkpointer.directory}"
             if latest is not None else "no checkpoint was written")
    what = (f"loss is {metrics['loss']} (ce {metrics['ce']}, kl {metrics['kl']})"
            if not math.isfinite(metrics["loss"]) else
            f"the updated weights are not finite (norm {metrics['param_norm']})")
    raise NonFiniteLoss(f"step {step}: {what}; stopping; {where}")


def _check_settings(config: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """Settings that could only fail later, checked before anything slow starts."""
    files.check_writable_directory(config.run.output_dir, "run.output_dir")
    if config.dev_eval.every and not config.dev_eval.files:
        raise ValueError(f"dev_eval.every is {config.dev_eval.every} but dev_eval.files is "
                         "empty: give dev question files (dev_eval.files=[...]) or set "
                         "dev_eval.every=0")
    batch_size = config.data.pipeline.batch_size
    if config.data.pipeline.packing and config.run.micro_batches > 1:
        raise ValueError("data.pipeline.packing takes run.micro_batches=1 (a packed batch's "
                         "span_index points into all of its rows)")
    sharding.check_batch_divides(
        batch_size * jax.process_count(), mesh,
        what=f"data.pipeline.batch_size ({batch_size} per process x {jax.process_count()} "
             "processes) or mesh.per_host")


def _check_memory(config: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """Stops before any weight is read when the weights and optimizer state alone exceed an
    accelerator's memory (TPU/GPU devices report it; CPU devices do not)."""
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    stats = local.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return
    from mcckd_jax.plan import report

    shortfall = report.state_shortfall(config, mesh, int(limit))
    if shortfall is not None:
        raise ValueError(f"{shortfall}; mcckd-plan CONFIG ... --topology <this slice> finds a "
                         "setting that fits (LoRA, more devices, fsdp)")


def _pipeline_config(config: TrainConfig, mesh: jax.sharding.Mesh) -> pipeline.PipelineConfig:
    """The pipeline's config; packed rows are grouped by this process's data-parallel devices,
    so that each device packs the sequences of its own questions."""
    pipe = config.data.pipeline
    if not pipe.packing:
        return pipe
    return dataclasses.replace(
        pipe, pack_groups=sharding.data_parallel_size(mesh) // jax.process_count())


def _load_data(config: TrainConfig, layout: str, vocab_size: int
               ) -> tuple[Any, tokenization.EncodedDataset]:
    """(tokenizer, tokenized training data), checked against the student's vocabulary."""
    tokenizer = run_inputs.load_run_tokenizer(config.data, config.student)
    encoded = run_inputs.load_train_data(config.data, tokenizer, layout)
    tokenization.check_vocabulary(
        [encoded.prompt_tokens, encoded.rationale_tokens,
         np.array([encoded.pad_id, encoded.decoder_start_id])], vocab_size, tokenizer)
    return tokenizer, encoded


def _warn_if_replicated(state: train_state.TrainState, mesh: jax.sharding.Mesh) -> None:
    if (sharding.is_model_parallel(mesh)
            and (fraction := train_state.replicated_fraction(state, mesh)) > 0.25):
        log.warning("%.0f%% of the parameter and optimizer bytes are replicated on every device; "
                    "check mesh.rules", 100 * fraction)


def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) the training of `config`."""
    mesh = sharding.make_mesh(config.mesh.per_host, config.mesh.across_hosts)
    rules = config.mesh.rules
    _check_settings(config, mesh)
    model_cls, architecture = pretrained.student_architecture(config.student)
    layout = pretrained.tokenization_layout(model_cls)
    tokenizer, encoded = _load_data(config, layout, architecture.vocab_size)
    _check_memory(config, mesh)
    # The data and the memory are checked before the weights are read: a mistake costs
    # seconds, not minutes.
    model = pretrained.build_student(config.student, mesh=mesh, rules=rules)
    dataset = pipeline.train_dataset(encoded, _pipeline_config(config, mesh))
    iterator: Iterator = iter(dataset)

    run = config.run
    tx = optimizer.make_optimizer(config.optimizer, run.steps)
    graphdef, state, shardings = train_state.create_train_state(model, tx, mesh=mesh, rules=rules)
    del model
    _warn_if_replicated(state, mesh)
    dev = None
    if config.dev_eval.every:
        dev = DevEvaluator(config.dev_eval, tokenizer,
                           dataclasses.replace(config.data.tokenization, layout=layout),
                           graphdef=graphdef, mesh=mesh, output_dir=run.output_dir)
    checkpointer = checkpointing.Checkpointer(
        run.output_dir, save_every=run.checkpoint_every, keep=run.keep_checkpoints,
        async_save=run.async_checkpoints, best_metric="dev_accuracy" if dev else None,
        keep_best=config.dev_eval.keep_best)
    state = checkpointer.restore_latest(state, shardings, iterator) or state
    start = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        config_lib.save(config, f"{run.output_dir}/config.yaml")

    step_fn = train_step.make_train_step(
        graphdef, tx, config.objective, optimizer.learning_rate_schedule(config.optimizer, run.steps),
        run.micro_batches)
    batch_sharding = sharding.batch_sharding(mesh)
    logger = MetricsLogger(run.output_dir, total_steps=run.steps, start_step=start,
                           progress_bar=run.progress_bar, tensorboard=run.tensorboard)
    if start:
        logger.message(f"resumed from checkpoint {start} in {checkpointer.directory}")
    preemption = _Preemption()
    previous_handler = signal.signal(signal.SIGTERM, preemption)
    records_out: list[dict] = []
    try:
        with sharding.activate(mesh, rules):
            compiled = _CompiledSteps(jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                                              out_shardings=(shardings, None), donate_argnums=0))
            records_out = _loop(run, state, iterator, compiled, batch_sharding, checkpointer,
                                logger, preemption, start, dev, config.dev_eval.every)
        if preemption.signal is None:
            logger.message(f"trained to step {run.steps}: checkpoints in "
                           f"{checkpointer.directory}, metrics in {run.output_dir}/metrics.jsonl")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        checkpointer.wait()
        checkpointer.close()
        logger.close()
    return TrainResult(records=records_out, stopped_by_signal=preemption.signal)


def _loop(run, state, iterator, compiled, batch_sharding, checkpointer, logger, preemption,
          start: int, dev: DevEvaluator | None, dev_every: int) -> list[dict]:
    logged, pending, positions_seen = [], None, 0.0
    loss_tokens_seen = [0.0]  # from each step's metrics (the global count, every process)
    real_tokens_seen = [0.0]  # non-padding tokens, likewise

    def flush(pending):
        step, metrics_device, positions = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics_device).items()}
        _check_finite(step, metrics, checkpointer)
        loss_tokens_seen[0] += metrics["ce_tokens"]
        real_tokens_seen[0] += metrics["real_tokens"]
        if step % run.log_every == 0 or step == run.steps:
            logged.append(logger.log(step, metrics, positions, loss_tokens_seen[0],
                                     real_tokens_seen[0]))
        return metrics

    for step in range(start + 1, run.steps + 1):
        batch = _step_batch(next(iterator), batch_sharding)
        positions_seen += sum(float(np.prod(batch[name].shape))  # padding included
                              for name in ("tokens", "encoder_tokens") if name in batch)
        state, metrics_device = compiled(state, batch)
        if pending is not None:
            flush(pending)  # step n-1's metrics, fetched after step n is dispatched
        pending = (step, metrics_device, positions_seen)
        evaluate = dev is not None and (step % dev_every == 0 or step == run.steps)
        due = (step % run.checkpoint_every == 0 or step == run.steps or preemption.requested
               or evaluate)
        if due:
            metrics = flush(pending)  # never checkpoint a state whose loss is not finite
            pending = None
            if evaluate:
                dev_metrics = dev(step, state)
                logged.append(logger.log_eval(step, dev_metrics))
                metrics = {**metrics, **dev_metrics}  # ranks the checkpoint by dev_accuracy
            checkpointer.save(state, iterator, force=True, metrics=metrics)
        if preemption.requested:
            logger.message(f"stopped at step {step} on request; resume by running again")
            break
    if pending is not None:
        flush(pending)
    return logged
