"""One mcckd-eval invocation: the mesh, tokenizer and datasets loaded once, then one
checkpoint, the initial student, or (--watch) every checkpoint a training run writes."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from mcckd_jax import sharding
from mcckd_jax.data import run_inputs, tokenization
from mcckd_jax.eval import reports, restore, runner
from mcckd_jax.models import pretrained
from mcckd_jax.train import checkpointing
from mcckd_jax.train.config import TrainConfig

log = logging.getLogger(__name__)


def summary_line(step: int, name: str, summary: Mapping[str, Any]) -> str:
    """The line mcckd-eval prints for one dataset at one step."""
    return (f"step {step} {name} ({summary['role']}): accuracy {summary['accuracy']:.1%} "
            f"({summary['correct']}/{summary['questions']}), no answer "
            f"{summary['missing_rate']:.1%}")


class EvalSession:
    """Evaluates students of one training config on the datasets of one EvalConfig."""

    def __init__(self, train_config: TrainConfig, eval_config: runner.EvalConfig, *,
                 output_dir: str | pathlib.Path, run_dir: str | pathlib.Path | None = None,
                 should_stop: Callable[[], bool] = lambda: False):
        self.train_config, self.eval_config = train_config, eval_config
        self.output_dir = pathlib.Path(output_dir)
        self.run_dir = pathlib.Path(run_dir) if run_dir is not None else None
        self.should_stop = should_stop
        self._seen: set[int] = set()  # checkpoints listed so far (--watch)
        self._skipped: set[int] = set()  # damaged or deleted before they were read
        self.rules = train_config.mesh.rules
        self.mesh = sharding.make_mesh(train_config.mesh.per_host, train_config.mesh.across_hosts)
        self.tokenizer = run_inputs.load_run_tokenizer(train_config.data, train_config.student)
        model_cls, architecture = pretrained.student_architecture(train_config.student)
        self.layout = pretrained.tokenization_layout(model_cls)
        self.tokenization = dataclasses.replace(train_config.data.tokenization, layout=self.layout)
        self.data = runner.load_eval_data(eval_config, self.tokenizer, self.tokenization)
        tokenization.check_vocabulary(
            [data.prompts.prompt_tokens for data in self.data] + [
                np.array([data.prompts.pad_id for data in self.data])],
            architecture.vocab_size, self.tokenizer)

    def settings(self) -> dict[str, Any]:
        config = self.eval_config
        student = self.train_config.student
        initial = (f"initial student: {student.checkpoint}" if student.checkpoint else
                   f"initial student: random init (seed {student.init_seed})")
        return {"source": str(self.run_dir) if self.run_dir else initial,
                "temperature": config.sampling.temperature, "top_p": config.sampling.top_p,
                "max_new_tokens": config.sampling.max_new_tokens,
                "num_samples": config.num_samples, "seed": config.seed,
                "max_questions": config.max_questions, "task": self.tokenization.task}

    def evaluate_model(self, step: int, model: nnx.Module) -> dict[str, Any] | None:
        """Scores `model` (as of training step `step`) on every dataset and writes the
        results; None when stopped before the end (nothing is written then)."""
        results = {}
        with sharding.activate(self.mesh, self.rules):
            for data in self.data:
                result = runner.evaluate(model, data, self.tokenizer, config=self.eval_config,
                                         tokenization_config=self.tokenization, mesh=self.mesh,
                                         should_stop=self.should_stop)
                if result is None:
                    return None
                results[data.dataset.name] = result
        if jax.process_index() != 0:
            return {"step": step}
        metrics = reports.write_step(self.output_dir, step, results, self.settings())
        if self.run_dir is not None:
            reports.write_tensorboard(self.run_dir, step, metrics["datasets"])
        for name, summary in metrics["datasets"].items():
            print(summary_line(step, name, summary), flush=True)
        log.info("step %d: predictions and metrics in %s", step, self.output_dir / f"step_{step}")
        return metrics

    def evaluate_checkpoint(self, step: int | None = None) -> dict[str, Any] | None:
        """The run's checkpoint `step` (default: the latest)."""
        step, model = restore.restore_student(self.run_dir, self.train_config.student,
                                              mesh=self.mesh, rules=self.rules, step=step)
        return self.evaluate_model(step, model)

    def evaluate_initial(self) -> dict[str, Any] | None:
        """The student before any training, reported as step 0."""
        return self.evaluate_model(0, restore.initial_student(
            self.train_config.student, mesh=self.mesh, rules=self.rules))

    def _new_steps(self) -> list[int]:
        """Finalized checkpoints not evaluated or skipped yet, oldest first; process 0 decides
        for everyone (and names the checkpoints deleted before they could be read)."""
        steps = np.full(64, -1, np.int64)
        if jax.process_index() == 0:
            directory = self.run_dir / "checkpoints"
            found = set(ocp.utils.checkpoint_steps(directory) if directory.exists() else [])
            done = reports.evaluated_steps(self.output_dir) | self._skipped
            self._report_deleted(found, done)
            new = sorted(found - done)[:64]
            steps[:len(new)] = new
        steps = multihost_utils.broadcast_one_to_all(steps)
        return [int(s) for s in steps if s >= 0]

    def _report_deleted(self, found: set[int], done: set[int]) -> None:
        """Warns once about each checkpoint the run should have written (every
        run.checkpoint_every steps up to the newest one seen) that is gone unevaluated: the
        trainer's keep policy deleted it before this process got to it."""
        self._seen |= found
        every = self.train_config.run.checkpoint_every
        newest = max(self._seen | done, default=0)
        expected = set(range(every, newest + 1, every)) | self._seen
        deleted = sorted(expected - found - done)
        if deleted:
            which = (f"checkpoint {deleted[0]} was" if len(deleted) == 1 else
                     f"checkpoints {', '.join(map(str, deleted))} were")
            log.warning("%s deleted before evaluation (the run keeps the last "
                        "run.keep_checkpoints=%d); evaluation is slower than training: evaluate "
                        "fewer questions or keep more checkpoints", which,
                        self.train_config.run.keep_checkpoints)
            self._skipped |= set(deleted)

    def watch(self, *, poll: Callable[[float], None], poll_seconds: float) -> None:
        """Evaluates each checkpoint as it appears, oldest first, until the run's last step
        (run.steps) is evaluated or a stop is requested. A damaged checkpoint, or one deleted
        before it was read, is named and skipped."""
        final = self.train_config.run.steps
        log.info("watching %s for checkpoints (last step %d)", self.run_dir / "checkpoints", final)
        while not self.should_stop():
            for step in self._new_steps():
                try:
                    if self.evaluate_checkpoint(step) is None:
                        return
                except FileNotFoundError:  # deleted by the trainer's keep policy meanwhile
                    log.warning("checkpoint %d was deleted before it was read (the run keeps the "
                                "last run.keep_checkpoints=%d); skipped", step,
                                self.train_config.run.keep_checkpoints)
                except checkpointing.DamagedCheckpoint as error:
                    log.warning("%s; skipped", error)
                self._skipped.add(step)
                if step >= final:
                    return
            poll(poll_seconds)
