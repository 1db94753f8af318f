"""A plan: per-device memory of the train state and the compiled programs against the chip's
memory, FLOPs, and a step-time estimate, as one JSON-ready dict and as text.

Memory (bytes per device): `weights` (every parameter, trainable or frozen), `optimizer`
(its state), and each compiled program's XLA memory analysis, whose peak (arguments + outputs
- aliased + temporaries) is what must fit. Weights and optimizer state are the train step's
arguments; on a TPU they are laid out in tiles, so the compiled arguments exceed their raw
bytes by the padding.

FLOPs: XLA's count of the compiled step on one device (remat recomputation included), and the
model FLOPs per token, 3 x the forward pass's (forward, then backward for activations and
weights) when every weight trains, 2 x under LoRA (frozen weights get no gradient): the
numerator of model FLOPs utilisation (MFU). The estimate divides the model FLOPs of a step by
the chips' bf16 peak at a stated MFU: an estimate, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.plan import programs, topology
from mcckd_jax.train.config import TrainConfig

GIB = 2**30


def host_memory_bytes() -> int:
    """This machine's memory (MemTotal), the budget of a CPU target's devices together."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(target: topology.Target, devices: int) -> int:
    """Memory one device may use: the chip's HBM split over the devices the topology makes of
    it (v4 topologies list each TensorCore), or this host's memory split over CPU devices."""
    if target.platform == "cpu":
        return host_memory_bytes() // devices
    return target.chip.hbm_bytes * target.chips // devices


def _weights_and_optimizer(state) -> tuple[int, int]:
    weights = [nnx.filter_state(part, nnx.Param) for part in (state.params, state.model_state)]
    return programs.per_device_bytes(weights), programs.per_device_bytes(state.opt_state)


def parameter_counts(student: programs.Student) -> dict[str, int]:
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    return {"total": count(nnx.filter_state(student.params, nnx.Param))
            + count(nnx.filter_state(student.model_state, nnx.Param)),
            "trainable": count(student.params)}


def forward_flops_per_token(config: TrainConfig) -> float | None:
    """XLA's FLOPs of the student's forward pass per position (all layers and the output
    projection over the vocabulary), for one sequence of the largest bucket length, counted
    on the unoptimised program for one CPU device (whatever the target: the count is of the
    model, and not every backend counts)."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])
    # Without remat the layers are a Python loop: XLA counts a scanned loop's body once.
    unrolled = dataclasses.replace(
        config, student=dataclasses.replace(config.student, remat_policy="none"))
    student = programs.abstract_student(unrolled, mesh)
    pipe = config.data.pipeline
    length = max(pipe.bucket_lengths)
    shape = (1, 1, length)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
             "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct(shape, jnp.bool_)}
    if student.layout == "encoder_decoder":
        encoder = (1, max(pipe.encoder_bucket_lengths))
        batch["encoder_tokens"] = jax.ShapeDtypeStruct(encoder, jnp.int32)
        batch["encoder_mask"] = jax.ShapeDtypeStruct(encoder, jnp.bool_)

    def forward(params, model_state, batch):
        model = nnx.merge(student.graphdef, params, model_state)
        hidden = model.batch_hidden(batch)
        return jnp.einsum("bkld,dv->bklv", hidden, model.output_weight())

    with sharding.activate(mesh, config.mesh.rules):
        lowered = jax.jit(forward).lower(student.params, student.model_state, batch)
    costs = lowered.cost_analysis()
    if not costs or "flops" not in costs:
        return None
    return float(costs["flops"]) / length


def state_shortfall(config: TrainConfig, mesh: jax.sharding.Mesh, budget: int) -> str | None:
    """None when the weights and optimizer state of `config` fit `budget` bytes per device on
    `mesh`; else the one-line reason (from shapes alone: nothing is compiled or read)."""
    student = programs.abstract_student(config, mesh)
    state, _ = programs.abstract_state(config, student, mesh)
    return _shortfall(sum(_weights_and_optimizer(state)), budget)


def _shortfall(state_bytes: int, budget: int) -> str | None:
    if state_bytes <= budget:
        return None
    return (f"weights and optimizer state alone need {size(state_bytes)} per device of "
            f"{size(budget)}")


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a plan is of: the config, the target, the mesh and the process count."""

    config: TrainConfig
    target: topology.Target
    mesh: jax.sharding.Mesh
    processes: int
    mfu: float
    budget: int | None = None  # bytes per device; None: the chip's (device_memory_bytes)


def plan(setting: Setting, *, decoding: bool = True) -> dict[str, Any]:
    """The plan of one setting (compiles the train step, and the decoding unless told not to)."""
    config, mesh = setting.config, setting.mesh
    student = programs.abstract_student(config, mesh)
    state, shardings = programs.abstract_state(config, student, mesh)
    weights, optimizer_state = _weights_and_optimizer(state)
    budget = setting.budget or device_memory_bytes(setting.target, mesh.size)
    result: dict[str, Any] = {
        "topology": setting.target.name, "platform": setting.target.platform,
        "chip": setting.target.chip.name, "devices": mesh.size, "processes": setting.processes,
        "mesh": dict(mesh.shape), "parameters": parameter_counts(student),
        "memory_per_device": {"budget": budget, "weights": weights,
                              "optimizer": optimizer_state}}
    if weights + optimizer_state > budget:
        result["fits"] = False
        result["reason"] = _shortfall(weights + optimizer_state, budget)
        return result
    train = programs.compile_train_step(config, student, (state, shardings), mesh,
                                        setting.processes)
    result["memory_per_device"]["train_step"] = train.memory
    # XLA's count of the compiled step counts the body of a loop once (the scanned layers):
    # a lower bound, kept for comparison between settings; model FLOPs are the measure.
    result["train_step"] = {"shapes": train.shapes, "compile_seconds": round(train.seconds, 1),
                            "xla_flops_per_device_loops_once": train.flops_per_device}
    peaks = {"train step": train.memory["peak"] if train.memory else 0}
    if decoding:
        decode = programs.compile_decoding(config, student, mesh, setting.processes)
        result["memory_per_device"]["decoding"] = decode.memory
        result["decoding"] = {"shapes": decode.shapes,
                              "compile_seconds": round(decode.seconds, 1),
                              "max_new_tokens": config.dev_eval.max_new_tokens}
        peaks["decoding"] = decode.memory["peak"] if decode.memory else 0
    worst = max(peaks, key=peaks.get)
    result["fits"] = peaks[worst] <= budget
    result["largest"] = worst
    if not result["fits"]:
        result["reason"] = (f"the {worst} needs {size(peaks[worst])} per device of "
                            f"{size(budget)}")
    result["flops"] = _flops(setting, train)
    return result


def _flops(setting: Setting, train: programs.Compiled) -> dict[str, Any]:
    config = setting.config
    forward = forward_flops_per_token(config)
    shapes = train.shapes
    positions = math.prod(shapes["tokens"]) + math.prod(shapes.get("encoder_tokens", (0,)))
    flops: dict[str, Any] = {"positions_per_step": positions}
    if forward is None:
        return flops
    passes = 2 if config.student.lora is not None else 3
    per_token = passes * forward
    flops["model_flops_per_token"] = per_token
    flops["model_flops_per_step"] = per_token * positions
    chip = setting.target.chip
    if chip.peak_bf16_flops:
        peak = chip.peak_bf16_flops * setting.target.chips
        seconds = per_token * positions / (peak * setting.mfu)
        flops["estimate"] = {"mfu": setting.mfu, "step_seconds": seconds,
                             "tokens_per_second": positions / seconds,
                             "basis": f"{chip.name} bf16 peak {chip.peak_bf16_flops / 1e12:.0f} "
                                      f"TFLOP/s x {setting.target.chips} chips"}
    return flops


def size(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB / 4 else f"{count / 2**20:.2f} MiB"


def render(result: dict[str, Any]) -> str:
    """The plan as a few lines of text."""
    memory = result["memory_per_device"]
    lines = [f"{result['topology']} ({result['chip']}): {result['devices']} devices, "
             f"{result['processes']} process(es), mesh {result['mesh']}",
             f"parameters: {result['parameters']['total']:,} "
             f"({result['parameters']['trainable']:,} trainable)",
             f"per device: weights {size(memory['weights'])}, optimizer "
             f"{size(memory['optimizer'])}"]
    for name in ("train_step", "decoding"):
        if memory.get(name):
            program = memory[name]
            lines.append(f"  {name.replace('_', ' ')}: peak {size(program['peak'])} "
                         f"(arguments {size(program['arguments'])}, temporaries "
                         f"{size(program['temporaries'])}, outputs {size(program['outputs'])}, "
                         f"aliased {size(program['aliased'])})")
    lines.append(f"  of {size(memory['budget'])}: "
                 + ("fits" if result["fits"] else f"DOES NOT FIT ({result['reason']})"))
    flops = result.get("flops", {})
    if "model_flops_per_token" in flops:
        lines.append(f"model FLOPs: {flops['model_flops_per_token'] / 1e9:.2f} GFLOP per token, "
                     f"{flops['positions_per_step']:,} positions per step")
    if "estimate" in flops:
        estimate = flops["estimate"]
        lines.append(f"ESTIMATE at {estimate['mfu']:.0%} MFU ({estimate['basis']}): "
                     f"{estimate['step_seconds']:.2f} s per step, "
                     f"{estimate['tokens_per_second']:,.0f} positions/s")
    return "\n".join(lines)
