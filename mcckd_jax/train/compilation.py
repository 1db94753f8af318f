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
