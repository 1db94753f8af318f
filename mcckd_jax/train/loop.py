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

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mcckd_jax import config as config_lib
from mcckd_jax import files, host_memory, sharding
from mcckd_jax.data import pipeline, records, tokenization
from mcckd_jax.models import pretrained
from mcckd_jax.train import checkpointing, compilation, optimizer, state as train_state
from mcckd_jax.train import step as train_step
from mcckd_jax.train.config import TrainConfig
from mcckd_jax.train.dev_eval import DevEvaluator
from mcckd_jax.train.metrics import MetricsLogger

log = logging.getLogger(__name__)

STEP_FIELDS = ("tokens", "targets", "loss_mask", "rationale_mask", "span_positions", "span_mask",
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


def load_run_tokenizer(config: TrainConfig):
    """The tokenizer of a run: data.tokenizer, else the student checkpoint's."""
    data = config.data
    tokenizer_path = data.tokenizer or config.student.checkpoint
    if tokenizer_path is None:
        raise ValueError("data.tokenizer is not set and the student has no checkpoint to take "
                         "the tokenizer from")
    return tokenization.load_tokenizer(
        tokenizer_path, data.tokenizer_gguf_file if data.tokenizer else config.student.gguf_file)


def load_train_data(config: TrainConfig, tokenizer, layout: str) -> tokenization.EncodedDataset:
    """Reads and tokenizes the training files (the same on every process)."""
    data = config.data
    if not data.train_files:
        raise ValueError("data.train_files is empty: give prepared files (mcckd-prepare output)")
    read = records.read_records(data.train_files, skip_bad_records=data.skip_bad_records,
                                require_rationales=True, task=data.tokenization.task)
    if read.skipped:
        log.warning("skipped %d bad records; first: %s", len(read.skipped), read.skipped[0])
    encoded, report = tokenization.encode_records(
        read.records, tokenizer, dataclasses.replace(data.tokenization, layout=layout))
    log.info("training data: %s", report)
    if encoded.num_questions == 0:
        raise ValueError(f"no trainable question in {', '.join(data.train_files)}: {report}")
    _check_length_drops(report, data)
    return encoded


def _check_length_drops(report: Mapping, data) -> None:
    """Warns about what data.tokenization.max_length (and max_encoder_length) dropped, and
    stops when it is more than data.max_length_drop_fraction of the questions or rationales."""
    lost = report["length_drops"]
    if not (lost["questions"] or lost["rationales"]):
        return
    shares = {kind: lost[kind] / max(report[f"{kind}_in"], 1) for kind in lost}
    text = (f"the length limits (data.tokenization.max_length={data.tokenization.max_length}, "
            f"max_encoder_length={data.tokenization.max_encoder_length}) drop "
            f"{lost['questions']} of {report['questions_in']} questions "
            f"({shares['questions']:.0%}) and {lost['rationales']} of {report['rationales_in']} "
            f"rationales ({shares['rationales']:.0%})")
    if max(shares.values()) > data.max_length_drop_fraction:
        raise ValueError(f"{text}, more than data.max_length_drop_fraction="
                         f"{data.max_length_drop_fraction}: raise max_length, or allow it with "
                         "data.max_length_drop_fraction")
    log.warning("%s", text)


def global_batch(local: Mapping[str, np.ndarray], batch_sharding: NamedSharding) -> dict:
    """Global arrays from this process's rows of the batch."""
    return {name: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
            for name, value in local.items() if name in STEP_FIELDS}


class _CompiledSteps:
    """One AOT-compiled executable per batch shape, with its memory analysis logged."""

    def __init__(self, jitted):
        self.jitted, self.executables = jitted, {}

    def __call__(self, state, batch):
        key = tuple(sorted((name, value.shape) for name, value in batch.items()))
        if key not in self.executables:
            compiled = compilation.compile_train_step(self.jitted, state, batch)
            memory = compiled.memory_analysis()
            if memory is not None:
                log.info("compiled step for %s: temp %.2f GiB, arguments %.2f GiB", dict(key),
                         memory.temp_size_in_bytes / 2**30, memory.argument_size_in_bytes / 2**30)
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


def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) the training of `config`."""
    files.check_writable_directory(config.run.output_dir, "run.output_dir")
    if config.dev_eval.every and not config.dev_eval.files:
        raise ValueError(f"dev_eval.every is {config.dev_eval.every} but dev_eval.files is "
                         "empty: give dev question files (dev_eval.files=[...]) or set "
                         "dev_eval.every=0")
    mesh = sharding.make_mesh(config.mesh.per_host, config.mesh.across_hosts)
    rules = config.mesh.rules
    questions = config.data.pipeline.batch_size * jax.process_count()
    if questions % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(
            f"a global batch of {questions} questions (data.pipeline.batch_size "
            f"{config.data.pipeline.batch_size} x {jax.process_count()} processes) does not "
            f"split over the mesh's data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']} "
            "devices; change data.pipeline.batch_size or mesh.per_host")
    model_cls, architecture = pretrained.student_architecture(config.student)
    layout = pretrained.tokenization_layout(model_cls)
    tokenizer = load_run_tokenizer(config)
    encoded = load_train_data(config, tokenizer, layout)
    tokenization.check_vocabulary(
        [encoded.prompt_tokens, encoded.rationale_tokens,
         np.array([encoded.pad_id, encoded.decoder_start_id])],
        architecture.vocab_size, tokenizer)
    # The data is checked before the weights are read: a mistake costs seconds, not minutes.
    model = pretrained.build_student(config.student, mesh=mesh, rules=rules)
    dataset = pipeline.train_dataset(encoded, config.data.pipeline)
    iterator: Iterator = iter(dataset)

    run = config.run
    tx = optimizer.make_optimizer(config.optimizer, run.steps)
    graphdef, state, shardings = train_state.create_train_state(model, tx, mesh=mesh, rules=rules)
    del model
    model_parallel = mesh.shape["fsdp"] * mesh.shape["tensor"] > 1
    if model_parallel and (fraction := train_state.replicated_fraction(state, mesh)) > 0.25:
        log.warning("%.0f%% of the parameter and optimizer bytes are replicated on every device; "
                    "check mesh.rules", 100 * fraction)
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
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
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

    def flush(pending):
        step, metrics_device, positions = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics_device).items()}
        _check_finite(step, metrics, checkpointer)
        loss_tokens_seen[0] += metrics["ce_tokens"]
        if step % run.log_every == 0 or step == run.steps:
            logged.append(logger.log(step, metrics, positions, loss_tokens_seen[0]))
        return metrics

    for step in range(start + 1, run.steps + 1):
        batch = global_batch(next(iterator), batch_sharding)
        positions_seen += float(np.prod(batch["tokens"].shape))
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
