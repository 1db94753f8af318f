"""Targets of a plan: TPU topologies by name (compiled deviceless through libtpu) and the
forced-device CPU mesh, with each chip's memory and peak bfloat16 FLOP/s.

Names: `v5e-8` (a slice by its chip count; v4 and v5p by TensorCore count, as Cloud TPU
names them), `v5e:2x4` (a shape), `cpu:8`. The environment must be prepared by
`prepare_environment` before JAX is imported: libtpu reads its settings once, and CPU devices
are forced at backend start.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's public numbers (Cloud TPU and NVIDIA data sheets)."""

    name: str
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # dense, per chip per second
    cores_per_chip: int = 1  # TensorCores in a Cloud TPU name's count (v4-8: 4 chips)
    dims: int = 2  # topology dimensions (v4/v5p: 3D tori)


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, cores_per_chip=2, dims=3),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, cores_per_chip=2, dims=3),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12),
    # NVIDIA SXM parts, dense bf16 tensor-core peaks; memory as XLA's target descriptions give
    # it (mcckd_jax.plan.gpu).
    "h100": Chip("NVIDIA H100", 84929347584, 989e12),
    "h200": Chip("NVIDIA H200", 151397597184, 989e12),
    "a100": Chip("NVIDIA A100 80GB", 85100068864, 312e12),
}
GPU_KINDS = ("h100", "h200", "a100")
# The CPU target plans against this host's memory; its "peak" is no basis for an estimate.
CPU_CHIP = Chip("CPU", 0, 0.0)


@dataclasses.dataclass(frozen=True)
class Target:
    """What `--topology` names."""

    name: str  # as given
    platform: str  # "tpu", "gpu" or "cpu"
    kind: str  # CHIPS key, or "cpu"
    shape: tuple[int, ...]  # chips per topology axis (TPU); (hosts, GPUs per host); (devices,)
    chip: Chip

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        """libtpu's name for the shape, e.g. "v5e:2x4"."""
        return f"{self.kind}:{'x'.join(map(str, self.shape))}"


def _slice_shape(kind: str, chips: int) -> tuple[int, ...]:
    """The shape Cloud TPU gives a slice of `chips` chips: 2D for v5e/v6e (1x1, 1x2, 2x2, 2x4,
    4x4, 4x8, ...), 3D for v4/v5p (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a {kind} slice has a power-of-two number of chips, not {chips}")
    if CHIPS[kind].dims == 2:
        rows = 2 ** (int(math.log2(chips)) // 2)
        return (rows, chips // rows)
    if chips < 4:
        raise ValueError(f"the smallest {kind} slice has 4 chips ({kind}-8)")
    if chips == 4:
        return (2, 2, 1)
    shape = [2, 2, 2]
    while math.prod(shape) < chips:  # double the last of the smallest axes
        axis = max(i for i, size in enumerate(shape) if size == min(shape))
        shape[axis] *= 2
    return tuple(shape)


def parse_target(name: str) -> Target:
    """A Target from a `--topology` value; ValueError (one line) for anything else."""
    text = name.strip().lower()
    if match := re.fullmatch(r"cpu:(\d+)", text):
        count = int(match.group(1))
        if count < 1:
            raise ValueError(f"--topology {name}: at least one CPU device")
        return Target(name, "cpu", "cpu", (count,), CPU_CHIP)
    if match := re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v6litepod)-(\d+)", text):
        kind = {"v5litepod": "v5e", "v6litepod": "v6e"}.get(match.group(1), match.group(1))
        count = int(match.group(2))
        chips, rest = divmod(count, CHIPS[kind].cores_per_chip)
        if rest or chips < 1:
            raise ValueError(f"--topology {name}: {kind} slices are named by their "
                             f"TensorCores, a multiple of {CHIPS[kind].cores_per_chip}")
        try:
            shape = _slice_shape(kind, chips)
        except ValueError as error:
            raise ValueError(f"--topology {name}: {error}") from None
        return Target(name, "tpu", kind, shape, CHIPS[kind])
    if match := re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", text):
        kind = match.group(1)
        shape = tuple(int(size) for size in match.group(2).split("x"))
        if len(shape) != CHIPS[kind].dims or min(shape) < 1:
            raise ValueError(f"--topology {name}: a {kind} shape has {CHIPS[kind].dims} "
                             "sizes, e.g. " + ("2x2x2" if CHIPS[kind].dims == 3 else "2x4"))
        return Target(name, "tpu", kind, shape, CHIPS[kind])
    if match := re.fullmatch(r"(h100|h200|a100):(?:(\d+)x)?(\d+)", text):
        hosts, per_host = int(match.group(2) or 1), int(match.group(3))
        if hosts < 1 or per_host < 1:
            raise ValueError(f"--topology {name}: at least one host and one GPU")
        return Target(name, "gpu", match.group(1), (hosts, per_host), CHIPS[match.group(1)])
    raise ValueError(f"--topology {name}: unknown; use a TPU slice (v4-8, v5e-8, v5p-8, v6e-16), "
                     "a TPU shape (v5e:2x4, v4:2x2x2), GPUs (h100:8, h200:4x8, a100:8: hosts x "
                     "GPUs per host) or cpu:N")


def prepare_environment(target: Target, environ=os.environ) -> None:
    """Sets what JAX and libtpu read at start (call before importing JAX): planning compiles
    on this machine's CPU whatever accelerator it has; libtpu gets a fixed identity instead of
    asking the GCE metadata server (no network), which also keeps its start silent."""
    environ["JAX_PLATFORMS"] = "cpu"
    if target.platform == "cpu":
        flags = [f for f in environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        environ["XLA_FLAGS"] = " ".join(
            flags + [f"--xla_force_host_platform_device_count={target.chips}"])
        return
    if target.platform == "gpu":
        from mcckd_jax.plan import gpu

        gpu.prepare_environment(environ)
        return
    environ["TPU_SKIP_MDS_QUERY"] = "1"
    # libtpu locks /tmp/libtpu_lockfile against a second process using the TPU; without a TPU
    # there is nothing to protect, and plans may run side by side.
    environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    environ.setdefault("TPU_ACCELERATOR_TYPE", f"{target.kind}-{target.chips}")
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    environ.setdefault("TPU_WORKER_ID", "0")


def target_devices(target: Target) -> list:
    """The devices of the target: the TPU topology's (deviceless), or this process's CPUs."""
    import jax

    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != target.chips:
            raise ValueError(f"--topology {target.name}: {len(devices)} CPU devices exist in "
                             "this process (XLA_FLAGS was set before JAX started)")
        return devices
    if target.platform == "gpu":
        from mcckd_jax.plan import gpu

        return gpu.devices(target.kind, *target.shape)
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(topology_name=target.topology_name,
                                                   platform="tpu")
    except Exception as error:  # libtpu missing or the shape unknown to it
        raise ValueError(f"--topology {target.name}: cannot compile for {target.topology_name} "
                         f"here ({' '.join(str(error).split())[:200]}); TPU plans need libtpu: "
                         "pip install -e \".[tpu]\"") from None
    return list(description.devices)
