"""Ahead-of-time compilation of the train step, with the XLA options the project sets.

Options are per compilation (`.compile(compiler_options=...)`), not process-wide XLA_FLAGS:
they concern the train step only, and the decoding loop compiled in the same process (dev
accuracy, mcckd-eval) is faster without them.

On the CPU backend XLA hands matmuls, reductions and elementwise fusions to YNNPACK. For the
train step, YNNPACK's reductions (the logsumexp over the vocabulary of every cross-entropy
chunk, the norms' mean squares) run slower than XLA's own loops; keeping YNNPACK for matmuls
only made the SmolLM2-135M benchmark step (4 questions x 2 rationales x 256 tokens, float32)
15.3 s -> 13.0 s on an AMD EPYC with AVX-512 (benchmarks/RESULTS.md, "Train step on AVX2 and
AVX-512 hosts"). The same option made greedy decoding 12% slower, hence train step only.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

# Option name -> value, as XLA's DebugOptions spell them (enum values by their proto names).
CPU_TRAIN_STEP_OPTIONS: Mapping[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
}


def train_step_options(platform: str) -> dict[str, str]:
    """The compiler options for a train step on `platform` ("cpu", "gpu", "tpu")."""
    return dict(CPU_TRAIN_STEP_OPTIONS) if platform == "cpu" else {}


def compile_train_step(jitted, *args) -> jax.stages.Compiled:
    """`jitted.lower(*args).compile(...)` with the options of the platform `args` live on."""
    platform = next(iter(jax.tree.leaves(args)[0].sharding.device_set)).platform
    return jitted.lower(*args).compile(compiler_options=train_step_options(platform))


def memory_summary(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """Per-device bytes of a compiled program (XLA's memory analysis): arguments, outputs,
    aliased (outputs written over donated arguments), temporaries, generated code, and the
    peak they imply (arguments + outputs - aliased + temporaries). None where the backend
    gives no analysis."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    summary = {"arguments": memory.argument_size_in_bytes,
               "outputs": memory.output_size_in_bytes,
               "aliased": memory.alias_size_in_bytes,
               "temporaries": memory.temp_size_in_bytes,
               "generated_code": memory.generated_code_size_in_bytes}
    summary["peak"] = (summary["arguments"] + summary["outputs"] - summary["aliased"]
                       + summary["temporaries"])
    return summary


def describe_memory(summary: dict[str, int]) -> str:
    """One line of `memory_summary`, bytes exact (mcckd-plan prints the same numbers)."""
    return ", ".join(f"{name} {value} B" for name, value in summary.items()
                     if name != "peak") + f" (peak {summary['peak'] / 2**30:.3f} GiB per device)"
