"""Why remat does not lower memory in the student on XLA CPU, and what does: the compiled
temporary memory of the gradient of a 30-layer SwiGLU stack (SmolLM2's widths, 2,048 tokens)
written as a Python loop or as `lax.scan`, each with and without `jax.checkpoint`.

    python benchmarks/remat_scan_memory.py

Compile-only (no step runs), so the numbers do not depend on the machine's load.
"""

import jax
import jax.numpy as jnp

TOKENS, WIDTH, INNER, LAYERS = 2048, 576, 1536, 30


def layer(x, weights):
    gate, up, down = weights
    return x + (jax.nn.silu(x @ gate) * (x @ up)) @ down


def python_loop(weights, x, remat):
    step = jax.checkpoint(layer) if remat else layer
    for i in range(LAYERS):
        x = step(x, tuple(w[i] for w in weights))
    return jnp.sum(x * x)


def scanned(weights, x, remat):
    step = jax.checkpoint(layer) if remat else layer
    x, _ = jax.lax.scan(lambda carry, w: (step(carry, w), None), x, weights)
    return jnp.sum(x * x)


def main() -> None:
    weights = tuple(jax.ShapeDtypeStruct((LAYERS,) + shape, jnp.float32)
                    for shape in ((WIDTH, INNER), (WIDTH, INNER), (INNER, WIDTH)))
    x = jax.ShapeDtypeStruct((TOKENS, WIDTH), jnp.float32)
    print("| layers as | remat | compiled temp GiB |\n| --- | --- | --- |")
    for name, fn in (("Python loop", python_loop), ("lax.scan", scanned)):
        for remat in (False, True):
            compiled = jax.jit(jax.grad(lambda w, v: fn(w, v, remat))).lower(weights, x).compile()
            print(f"| {name} | {remat} | {compiled.memory_analysis().temp_size_in_bytes / 2**30:.2f} |")


if __name__ == "__main__":
    main()
