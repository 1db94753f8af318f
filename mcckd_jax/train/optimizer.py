"""The optax transform from the config: AdamW or Adafactor, warmup + decay, clipping.

Gradient accumulation happens in the train step (exactly, by token and question counts), not
here.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adafactor"] = "adamw"  # adafactor is the usual choice for T5
    learning_rate: float = 2e-5  # peak learning rate, reached after warmup
    warmup_steps: int = 100  # linear warmup from 0, in optimizer steps
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup, down to end_lr
    end_learning_rate: float = 0.0  # learning rate at the last step of the run
    weight_decay: float = 0.0  # decoupled weight decay (AdamW); 0 disables
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    epsilon: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float | None = 1.0  # global-norm clipping; None disables

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup, then the configured decay until
    `total_steps` (the run's length)."""
    warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
    decay_steps = max(total_steps - config.warmup_steps, 1)
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps,
                                            alpha=config.end_learning_rate / config.learning_rate
                                            if config.learning_rate else 0.0)
    elif config.decay == "linear":
        decay = optax.linear_schedule(config.learning_rate, config.end_learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(config.learning_rate)
    if config.warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or Adafactor with the schedule."""
    schedule = learning_rate_schedule(config, total_steps)
    if config.name == "adamw":
        core = optax.adamw(schedule, b1=config.beta1, b2=config.beta2, eps=config.epsilon,
                           weight_decay=config.weight_decay)
    else:
        core = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None)
    chain = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []
    return optax.chain(*chain, core)
