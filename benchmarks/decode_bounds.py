"""What bounds a SmolLM2-135M decoding step on XLA's CPU backend: its pieces, measured alone.

Run by hand (not a test), from the repository root:

    python benchmarks/decode_bounds.py --batch 16

Each line times one jitted function (the best of --repeats calls, after a compiling call):
- `matmul chain`: the 211 weight matmuls of one decoding step (30 layers of q, k, v, o,
  gate, up, down and the tied vocabulary projection), float32, with nothing else in the
  program. It is the floor of the step on this backend: what remains of a real step is
  attention, norms, RoPE and the token choice. Also with the weights stored in bfloat16 (bf16
  dots, and upcast to float32 inside the function).
- `scores`: attention logits of one query row per head over 30 layers of separate caches
  (S = 256 slots), with the keys stored [B, K, S, Hd] and transposed [B, K, Hd, S] (ours).
- `token choice`: jnp.argmax over the vocabulary against `decoding.greedy_tokens`.
- `stream`: the bytes per second XLA reads on this machine (a jitted sum over 1 GiB), for
  scale.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), os.path.dirname(os.path.abspath(__file__))]
from model_step import SMOLLM2, matmul_params  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mcckd_jax.eval.decoding import greedy_tokens  # noqa: E402

WIDTH, INNER = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"]
LAYERS, VOCAB = SMOLLM2["num_hidden_layers"], SMOLLM2["vocab_size"]
HEADS, KV_HEADS = SMOLLM2["num_attention_heads"], SMOLLM2["num_key_value_heads"]
HEAD_DIM = WIDTH // HEADS
KV_WIDTH = KV_HEADS * HEAD_DIM


def best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def step_weights(rng, dtype) -> tuple[list[dict], jax.Array]:
    def weight(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, dtype)
    layers = [dict(q=weight(WIDTH, WIDTH), k=weight(WIDTH, KV_WIDTH), v=weight(WIDTH, KV_WIDTH),
                   o=weight(WIDTH, WIDTH), gate=weight(WIDTH, INNER), up=weight(WIDTH, INNER),
                   down=weight(INNER, WIDTH)) for _ in range(LAYERS)]
    return layers, weight(VOCAB, WIDTH)


def matmul_chain(x_BD, layers, embedding_VD, *, upcast: bool):
    """The step's weight matmuls in order; each layer's output feeds the next."""
    def w(weight):
        return weight.astype(jnp.float32) if upcast else weight
    for p in layers:
        q_BD = x_BD @ w(p["q"])
        kv_sum = jnp.sum(x_BD @ w(p["k"])) + jnp.sum(x_BD @ w(p["v"]))
        x_BD = x_BD + (q_BD + kv_sum * 0) @ w(p["o"])
        x_BD = x_BD + (jax.nn.silu(x_BD @ w(p["gate"])) * (x_BD @ w(p["up"]))) @ w(p["down"])
        x_BD = x_BD / (1 + jnp.max(jnp.abs(x_BD)))
    return jnp.argmax(x_BD @ w(embedding_VD).T, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--slots", type=int, default=256, help="KV cache slots S")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    batch, repeats = args.batch, args.repeats
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    params = matmul_params(SMOLLM2)
    for dtype, upcast in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
        layers, embedding = step_weights(rng, dtype)
        x = jnp.asarray(rng.standard_normal((batch, WIDTH), np.float32),
                        jnp.float32 if upcast else dtype)
        fn = jax.jit(lambda x, ls, e, upcast=upcast: matmul_chain(x, ls, e, upcast=upcast))
        seconds = best_seconds(fn, x, layers, embedding, repeats=repeats)
        bytes_read = params * jnp.dtype(dtype).itemsize
        label = f"matmul chain, {dtype} weights" + (" upcast to float32" if upcast else "")
        print(f"{label:48s} {seconds * 1e3:7.1f} ms  {2 * batch * params / seconds / 1e9:6.0f} "
              f"GFLOP/s  {bytes_read / seconds / 1e9:5.1f} GB/s of weights")
        del layers, embedding

    groups = HEADS // KV_HEADS
    query = jnp.asarray(rng.standard_normal((batch, KV_HEADS, groups, HEAD_DIM), np.float32))
    layouts = {"scores, keys [B, K, S, Hd]": ("bkgd,bksd->bkgs", (batch, KV_HEADS, args.slots, HEAD_DIM)),
               "scores, keys [B, K, Hd, S] (ours)": ("bkgd,bkds->bkgs", (batch, KV_HEADS, HEAD_DIM, args.slots))}
    for label, (equation, shape) in layouts.items():
        caches = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(LAYERS)]
        fn = jax.jit(lambda q, cs, eq=equation: sum(jnp.einsum(eq, q, c).sum() for c in cs))
        seconds = best_seconds(fn, query, caches, repeats=repeats)
        cache_bytes = 4 * np.prod(shape) * LAYERS
        print(f"{label:48s} {seconds / LAYERS * 1e6:7.1f} us per layer  "
              f"{cache_bytes / seconds / 1e9:5.1f} GB/s of keys")
        del caches

    logits = jnp.asarray(rng.standard_normal((batch, VOCAB), np.float32))
    for label, fn in (("token choice, jnp.argmax", jax.jit(lambda x: jnp.argmax(x, axis=-1))),
                      ("token choice, decoding.greedy_tokens", jax.jit(greedy_tokens))):
        seconds = best_seconds(fn, logits, repeats=repeats * 5)
        print(f"{label:48s} {seconds * 1e6:7.1f} us")

    data = jnp.ones(2 ** 28, jnp.float32)
    seconds = best_seconds(jax.jit(jnp.sum), data, repeats=repeats)
    print(f"{'stream (jitted sum over 1 GiB)':48s} {data.nbytes / seconds / 1e9:5.1f} GB/s")

if __name__ == "__main__":
    main()
