"""The configuration of a training run: one typed tree, loaded once by `mcckd-train`."""

from __future__ import annotations

import dataclasses

from mcckd_jax import sharding
from mcckd_jax.data.run_inputs import DataConfig
from mcckd_jax.models.pretrained import StudentConfig
from mcckd_jax.train.optimizer import OptimizerConfig
from mcckd_jax.train.step import ObjectiveConfig

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (axes `sharding.MESH_AXES`, in that order) and the logical-axis rules."""

    per_host: tuple[int, int, int] = (-1, 1, 1)  # sizes within a host; one may be -1 (fill)
    across_hosts: tuple[int, int, int] = (1, 1, 1)  # sizes across hosts (product = processes)
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = sharding.DEFAULT_RULES  # logical name -> mesh axes


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, outputs and checkpoints of the run."""

    output_dir: str = "runs/mcckd"  # checkpoints, metrics.jsonl, tensorboard/, config.yaml
    steps: int = 1000  # optimizer steps of the whole run (also the schedule's length)
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many
    log_every: int = 1  # steps between metrics records
    checkpoint_every: int = 100  # steps between checkpoints (one is also saved at the end)
    keep_checkpoints: int = 3  # most recent checkpoints kept
    async_checkpoints: bool = True  # write checkpoints in the background
    progress_bar: bool = True  # a tqdm bar on process 0
    tensorboard: bool = True  # TensorBoard event files under output_dir/tensorboard

    def __post_init__(self):
        if self.steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, log_every and checkpoint_every must be >= 1")


@dataclasses.dataclass(frozen=True)
class DevEvalConfig:
    """Greedy accuracy on dev questions during training, which also decides the checkpoints
    kept as best. Dev sets only: a test set must never choose the checkpoint."""

    files: tuple[str, ...] = ()  # dev question files (any format the data module reads)
    every: int = 0  # steps between evaluations (0: none); each also saves a checkpoint.
    # A config may set `every` and leave `files` to the command line; training refuses to
    # start while `every` > 0 and `files` is empty.
    max_questions: int | None = None  # the first N questions of each file
    batch_size: int = 16  # questions per batch and process
    max_new_tokens: int = 128
    keep_best: int = 1  # checkpoints with the best dev accuracy kept beside the latest ones

    def __post_init__(self):
        if self.every < 0 or self.keep_best < 0:
            raise ValueError("dev_eval.every and dev_eval.keep_best must be >= 0")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError(f"dev_eval.max_questions must be >= 1 (or unset for all "
                             f"questions), got {self.max_questions}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `mcckd-train` needs."""

    student: StudentConfig = StudentConfig()  # the model and where its weights come from
    data: DataConfig = DataConfig()  # training data and batching
    objective: ObjectiveConfig = ObjectiveConfig()  # alpha, temperature, CE chunking
    optimizer: OptimizerConfig = OptimizerConfig()  # AdamW/Adafactor and the schedule
    mesh: MeshConfig = MeshConfig()  # devices and sharding rules
    run: RunConfig = RunConfig()  # steps, outputs, checkpoints
    dev_eval: DevEvalConfig = DevEvalConfig()  # dev accuracy while training; best checkpoints
