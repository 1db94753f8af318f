"""Dev-set accuracy during training: greedy decoding of the current weights on the dev
questions, whose mean accuracy ranks the checkpoints kept as best.

Results go to <output_dir>/dev_eval in mcckd-eval's layout (predictions per step, metrics.jsonl)
and, as `dev_accuracy`, into the training metrics.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
from flax import nnx

from mcckd_jax.data import tokenization
from mcckd_jax.eval import decoding, reports, runner
from mcckd_jax.models import lora
from mcckd_jax.train.config import DevEvalConfig
from mcckd_jax.train.state import TrainState


class DevEvaluator:
    """`evaluator(step, state)` -> {"dev_accuracy", "dev_missing_rate", per-file accuracies}."""

    def __init__(self, config: DevEvalConfig, tokenizer: Any,
                 tokenization_config: tokenization.TokenizationConfig, *,
                 graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, output_dir: str | pathlib.Path):
        self.graphdef, self.mesh, self.tokenizer = graphdef, mesh, tokenizer
        self.tokenization = tokenization_config
        self.output_dir = pathlib.Path(output_dir) / "dev_eval"
        self.eval_config = runner.EvalConfig(
            datasets=tuple(runner.EvalDataset(name=pathlib.Path(path).stem, path=path, role="dev")
                           for path in config.files),
            batch_size=config.batch_size, max_questions=config.max_questions,
            sampling=decoding.SamplingConfig(max_new_tokens=config.max_new_tokens),
            progress_bar=False)
        self.data = runner.load_eval_data(self.eval_config, tokenizer, tokenization_config)

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        model = lora.merge_lora(nnx.merge(self.graphdef, state.params, state.model_state))
        results = {data.dataset.name: runner.evaluate(
            model, data, self.tokenizer, config=self.eval_config,
            tokenization_config=self.tokenization, mesh=self.mesh) for data in self.data}
        if jax.process_index() == 0:
            settings = {"source": "training", **dataclasses.asdict(self.eval_config.sampling)}
            reports.write_step(self.output_dir, step, results, settings)
        summaries = {name: summary for name, (_, summary) in results.items()}
        metrics = {f"dev/{name}/accuracy": s["accuracy"] for name, s in summaries.items()}
        metrics["dev_accuracy"] = sum(s["accuracy"] for s in summaries.values()) / len(summaries)
        metrics["dev_missing_rate"] = (sum(s["missing_rate"] for s in summaries.values())
                                       / len(summaries))
        return metrics
