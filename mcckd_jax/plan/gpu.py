"""NVIDIA GPU targets compiled deviceless: XLA's GPU compiler, given a target description
(an XLA GpuTargetConfigProto: the chip's SM count, memory, compute capability ...) instead of
a device, runs its whole HLO pipeline (fusion, scheduling, buffer assignment) and reports
memory, without a GPU, a driver or CUDA's libraries. It needs JAX's CUDA plugin
(`pip install -e ".[plan-gpu]"`, the jax-cuda12 plugin and PJRT at the project's JAX version);
keep it out of a training environment on a machine without GPUs: every JAX process there
prints the plugin's "Could not find cuda drivers" lines.

The descriptions are XLA's own (openxla/xla, xla/backends/gpu/target_config/specs). The
compiled GPU executable gives no cost analysis; XLA's HLO cost analysis of its optimised
module gives the FLOPs (`gpu_flops`).
"""

from __future__ import annotations

import os

# chip -> (SMs, FP32 units per SM, shared memory per SM / per block opt-in, memory bandwidth
# B/s, L2 bytes, clock GHz, device memory bytes, compute capability major, device name)
_SPECS = {
    "h100": (132, 128, 233472, 232448, 3352320000000, 52428800, 1.98, 84929347584, 9,
             "NVIDIA H100 80GB HBM3"),
    "h200": (132, 128, 233472, 232448, 4800000000000, 52428800, 1.98, 151397597184, 9,
             "NVIDIA H200 141GB HBM3e"),
    "a100": (108, 64, 167936, 166912, 2039040000000, 41943040, 1.41, 85100068864, 8,
             "NVIDIA A100-SXM4-80GB"),
}


def device_memory_bytes(kind: str) -> int:
    return _SPECS[kind][7]


def target_config(kind: str) -> str:
    """The GpuTargetConfigProto text of one chip kind."""
    sms, fpus, smem_core, smem_optin, bandwidth, l2, ghz, memory, major, name = _SPECS[kind]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} threads_per_core_limit: 2048 core_count: {sms}
  fpus_per_core: {fpus} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: {l2}
  clock_rate_ghz: {ghz} device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""


def prepare_environment(environ=os.environ) -> None:
    # The plugin checks the CUDA libraries' versions when it starts and refuses to register
    # without them; a deviceless compilation uses none of them.
    environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"


def devices(kind: str, hosts: int, per_host: int) -> list:
    """Compile-only devices of `hosts` x `per_host` GPUs of `kind`."""
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(
            platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=target_config(kind))
    except Exception as error:  # the CUDA plugin is not installed
        detail = " ".join(str(error).split())[:160]
        raise ValueError(f"cannot compile for {kind} here ({detail}); GPU plans need JAX's CUDA "
                         "plugin: pip install -e \".[plan-gpu]\"") from None
    return list(description.devices)


def gpu_flops(compiled) -> float | None:
    """FLOPs per device of a compiled GPU executable, by XLA's HLO cost analysis on the CPU
    client (the GPU executable has none of its own without a device)."""
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    modules = compiled.runtime_executable().hlo_modules()
    costs = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), modules[0])
    return float(costs["flops"]) if "flops" in costs else None
