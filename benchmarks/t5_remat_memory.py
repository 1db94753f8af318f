"""Compiled temporary memory of a T5 training step at flan-t5-base's widths (12 + 12 blocks,
d_model 768), by how the blocks run: a loop without remat, the loop with a checkpoint per block
(the T5 student before its blocks were scanned), and the scanned blocks with the "full" and
"dots" policies. The step is the gradient of the mean decoder cross-entropy (chunked, as the
train step computes it) over 2,048 encoder and 2,048 decoder tokens.

    python benchmarks/t5_remat_memory.py

Compile-only: weights and inputs are abstract (ShapeDtypeStruct), nothing is materialised and
the numbers do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mcckd_jax import losses, sharding
from mcckd_jax.models import t5, t5_stacks


@contextlib.contextmanager
def blocks_as_loop():
    """The blocks as a Python loop whatever the remat policy (each block under nnx.remat)."""
    scans_blocks = t5_stacks.scans_blocks
    t5_stacks.scans_blocks = lambda config: False
    try:
        yield
    finally:
        t5_stacks.scans_blocks = scans_blocks


def abstract_model(remat_policy: str, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    config = t5.flan_t5_base(remat_policy=remat_policy)
    with sharding.activate(mesh):
        return nnx.split(nnx.eval_shape(lambda: t5.T5Model(config, rngs=nnx.Rngs(0))))


def block_weights_gib(params: nnx.State) -> float:
    """Bytes of the encoder and decoder blocks' weights (what a scan stacks), in GiB."""
    return sum(v.get_value().size * v.get_value().dtype.itemsize
               for path, v in nnx.to_flat_state(params) if "block" in path) / 2**30


def compiled_temp_gib(remat_policy: str, batch: int, encoder_length: int,
                      decoder_length: int) -> float:
    mesh = sharding.make_mesh((-1, 1, 1))
    graphdef, params = abstract_model(remat_policy, mesh)

    def loss(params, input_ids_BL, decoder_ids_BT, targets_BT):
        model = nnx.merge(graphdef, params)
        hidden_BTD = model(input_ids_BL, None, decoder_ids_BT)
        return losses.chunked_token_cross_entropy(hidden_BTD, model.output_weight(), targets_BT,
                                                  jnp.ones(targets_BT.shape, bool))[0]

    tokens = lambda length: jax.ShapeDtypeStruct((batch, length), jnp.int32)  # noqa: E731
    with sharding.activate(mesh):
        lowered = jax.jit(jax.value_and_grad(loss)).lower(
            params, tokens(encoder_length), tokens(decoder_length), tokens(decoder_length))
        compiled = lowered.compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoder-length", type=int, default=256)
    parser.add_argument("--decoder-length", type=int, default=256)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}, "
          f"encoder length {args.encoder_length}, decoder length {args.decoder_length}; block "
          f"weights {block_weights_gib(abstract_model('none', sharding.make_mesh())[1]):.2f} GiB")
    print("| blocks as | remat policy | compiled temp GiB | compile s |\n| --- | --- | --- | --- |")
    for name, policy in (("loop", "none"), ("loop + checkpoint (before)", "full"),
                         ("lax.scan", "full"), ("lax.scan", "dots")):
        start = time.perf_counter()
        with blocks_as_loop() if name.startswith("loop") else contextlib.nullcontext():
            gib = compiled_temp_gib(policy, args.batch, args.encoder_length, args.decoder_length)
        print(f"| {name} | {policy} | {gib:.2f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
