"""The programs a run compiles, built from a config alone: the abstract student (no weight is
allocated or read; a checkpoint's config.json at most), the train state with its shardings,
the train step over the largest batch the pipeline makes, and the eval decoding program.

Each is lowered and compiled exactly as mcckd-train and mcckd-eval do (the same step
function, shardings, donation and compiler options), for whatever devices the mesh holds:
this process's CPUs or a TPU topology's devices without the TPU.

Shape legend: B questions, K rationales, L length, S span tokens, E encoder length,
P prompt length.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.data import batching
from mcckd_jax.eval import decoding
from mcckd_jax.models import pretrained
from mcckd_jax.train import compilation, optimizer, state as train_state
from mcckd_jax.train import step as train_step
from mcckd_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Student:
    """The abstract student of a config on a mesh."""

    graphdef: nnx.GraphDef
    params: nnx.State  # trainable (LoRA adapters, or every weight): ShapeDtypeStructs
    model_state: nnx.State  # the rest (frozen base weights, RNG streams)
    layout: str  # "decoder_only" or "encoder_decoder"
    config: Any  # the model config


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program: its per-device memory (compilation.memory_summary), XLA's
    FLOPs per device for one call, and the shapes it was compiled for."""

    memory: dict[str, int] | None
    flops_per_device: float | None
    shapes: dict[str, tuple[int, ...]]
    seconds: float


def _abstract_model(student_config, mesh: jax.sharding.Mesh, rules) -> nnx.Module:
    factory = pretrained.student_factory(student_config)
    with sharding.activate(mesh, rules):
        return nnx.eval_shape(factory)


def abstract_student(config: TrainConfig, mesh: jax.sharding.Mesh) -> Student:
    model_cls, architecture = pretrained.student_architecture(config.student)
    model = _abstract_model(config.student, mesh, config.mesh.rules)
    graphdef, params, model_state = train_state.split_model(model)
    return Student(graphdef, params, model_state, pretrained.tokenization_layout(model_cls),
                   architecture)


def abstract_state(config: TrainConfig, student: Student, mesh: jax.sharding.Mesh):
    """(ShapeDtypeStructs of the train state carrying their shardings, the shardings)."""
    tx = optimizer.make_optimizer(config.optimizer, config.run.steps)
    abstract, shardings = train_state.abstract_train_state(
        student.params, student.model_state, tx, mesh=mesh, rules=config.mesh.rules)
    return sharding.abstract_with_shardings(abstract, shardings), shardings


def _largest_shard(shape: tuple[int, ...], placed) -> tuple[int, ...]:
    """A leaf's largest shard: each dimension over the product of its mesh axes, rounded up
    (XLA pads a dimension its axes do not divide)."""
    if placed is None:
        return shape
    if not isinstance(placed, jax.sharding.NamedSharding):
        return placed.shard_shape(shape)
    sizes = []
    for size, axes in zip(shape, tuple(placed.spec) + (None,) * len(shape)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        parts = int(np.prod([placed.mesh.shape[name] for name in names], dtype=np.int64))
        sizes.append(-(-size // parts))
    return tuple(sizes)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = _largest_shard(leaf.shape, leaf.sharding)
        total += int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
    return total


def train_batch(config: TrainConfig, layout: str, mesh: jax.sharding.Mesh, processes: int
                ) -> dict[str, jax.ShapeDtypeStruct]:
    """The largest global train batch of the config: B = batch_size x processes questions at
    the largest bucket length (and encoder length)."""
    pipe = config.data.pipeline
    rows = pipe.batch_size * processes
    sharding.check_batch_divides(rows, mesh, what=f"data.pipeline.batch_size ({pipe.batch_size} "
                                 f"per process x {processes} processes) or mesh.per_host")
    spec = batching.train_batch_spec(
        rows, pipe.num_rationales, max(pipe.bucket_lengths), pipe.max_span_tokens,
        max(pipe.encoder_bucket_lengths) if layout == "encoder_decoder" else None)
    placed = sharding.batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
            for name, (shape, dtype) in spec.items() if name in _STEP_FIELDS}


# What the loop hands the step (train/loop.py STEP_FIELDS): question_index stays on the host.
_STEP_FIELDS = ("tokens", "targets", "loss_mask", "rationale_mask", "span_positions", "span_mask",
                "segment_ids", "positions", "span_index", "prompt_segment_ids",
                "encoder_tokens", "encoder_mask")


def _flops(compiled, mesh: jax.sharding.Mesh) -> float | None:
    costs = compiled.cost_analysis()
    if costs is None and mesh.devices.flat[0].platform in ("gpu", "cuda"):
        from mcckd_jax.plan import gpu

        return gpu.gpu_flops(compiled)
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else None
    return None if not costs or "flops" not in costs else float(costs["flops"])


def compile_train_step(config: TrainConfig, student: Student, state_and_shardings,
                       mesh: jax.sharding.Mesh, processes: int) -> Compiled:
    """The train step of mcckd-train (train/loop.py), compiled for the largest batch;
    `state_and_shardings` is `abstract_state`'s."""
    state, shardings = state_and_shardings
    batch = train_batch(config, student.layout, mesh, processes)
    tx = optimizer.make_optimizer(config.optimizer, config.run.steps)
    step_fn = train_step.make_train_step(
        student.graphdef, tx, config.objective,
        optimizer.learning_rate_schedule(config.optimizer, config.run.steps),
        config.run.micro_batches)
    start = time.perf_counter()
    with sharding.activate(mesh, config.mesh.rules):
        jitted = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(shardings, None), donate_argnums=0)
        compiled = compilation.compile_train_step(jitted, state, batch)
    return Compiled(compilation.memory_summary(compiled), _flops(compiled, mesh),
                    {name: value.shape for name, value in batch.items()},
                    time.perf_counter() - start)


def compile_decoding(config: TrainConfig, student: Student, mesh: jax.sharding.Mesh,
                     processes: int) -> Compiled:
    """The greedy decoding program of dev evaluation and mcckd-eval (eval/decoding.py) for
    dev_eval.batch_size x processes prompts of the largest bucket length, generating
    dev_eval.max_new_tokens tokens."""
    rows = config.dev_eval.batch_size * processes
    if rows % sharding.data_parallel_size(mesh):
        rows += sharding.data_parallel_size(mesh) - rows % sharding.data_parallel_size(mesh)
    pipe = config.data.pipeline
    length = max(pipe.encoder_bucket_lengths if student.layout == "encoder_decoder"
                 else pipe.bucket_lengths)
    placed = sharding.batch_sharding(mesh)
    prompt = jax.ShapeDtypeStruct((rows, length), np.int32, sharding=placed)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    # mcckd-eval decodes with LoRA adapters merged into the kernels (eval/restore.py).
    model = _abstract_model(dataclasses.replace(config.student, lora=None), mesh,
                            config.mesh.rules)
    graphdef, state = nnx.split(model)
    placed_state = sharding.abstract_with_shardings(
        state, sharding.tree_shardings(state, mesh, config.mesh.rules))
    with sharding.activate(mesh, config.mesh.rules):
        start = time.perf_counter()
        compiled = decoding._generate.lower(
            graphdef, placed_state, prompt, prompt, key,
            sampling=decoding.SamplingConfig(max_new_tokens=config.dev_eval.max_new_tokens),
            eos_token_ids=(0,), pad_token_id=0).compile()
    return Compiled(compilation.memory_summary(compiled), _flops(compiled, mesh),
                    {"prompt_tokens": prompt.shape}, time.perf_counter() - start)
