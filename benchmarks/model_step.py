"""Forward+backward throughput and peak memory: our NNX SmolLM2-135M vs transformers (PyTorch).

Run by hand (not a test):

    python benchmarks/model_step.py --batch 4 --length 256 --steps 5

Each framework runs in its own subprocess so that peak RSS is measured separately; both use
the same architecture (SmolLM2-135M, random weights: speed does not depend on their values),
the same batch and sequence length, float32, a mean token cross-entropy over the full
vocabulary, and all the machine's cores. Prints one JSON line per run and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# FLOPs of one token forward+backward: 6 per parameter that touches it (2 forward, 4 backward)
# plus attention scores/values, 12 * layers * length * width (causal halves the useful part,
# but both frameworks compute the full square, so it is counted).


def matmul_params(config: dict) -> int:
    """Weights a token is multiplied by: every layer's projections and the vocabulary head."""
    width, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv_width = config["num_key_value_heads"] * (width // config["num_attention_heads"])
    per_layer = 2 * width * width + 2 * width * kv_width + 3 * width * inner
    return layers * per_layer + width * config["vocab_size"]


def model_flops_per_token(config: dict, length: int) -> float:
    width, layers = config["hidden_size"], config["num_hidden_layers"]
    return 6 * matmul_params(config) + 12 * layers * length * width


SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
               rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_torch(batch: int, length: int, steps: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).train()
    tokens = torch.randint(0, SMOLLM2["vocab_size"], (batch, length))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.item()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return dict(framework="pytorch-transformers", threads=torch.get_num_threads(), seconds=seconds)


def run_jax(batch: int, length: int, steps: int, chunked: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mcckd_jax import losses, sharding
    from mcckd_jax.models import decoder, llama

    mesh = sharding.make_mesh((-1, 1, 1))
    config = llama.smollm2_135m()
    with sharding.activate(mesh):
        model = decoder.DecoderModel(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, config.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones((batch, length), bool).at[:, -1].set(False)

    def loss_fn(p):
        m = nnx.merge(graphdef, p)
        hidden = m(tokens)
        if chunked:
            return losses.chunked_token_cross_entropy(hidden, m.output_weight(), targets, mask,
                                                      chunk_size=256)[0]
        return losses.token_cross_entropy(m.logits(hidden), targets, mask)[0]

    with sharding.activate(mesh):
        grad_fn = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
    jax.block_until_ready(grad_fn(params))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        loss, grads = grad_fn(params)
    jax.block_until_ready((loss, grads))
    seconds = (time.perf_counter() - start) / steps
    temp = grad_fn.memory_analysis().temp_size_in_bytes / 2**30
    return dict(framework="jax-nnx" + (" chunked-CE" if chunked else ""), seconds=seconds,
                compiled_temp_gib=round(temp, 3))


FRAMEWORKS = ("torch", "jax", "jax-chunked")


def child_command(args, framework: str) -> list[str]:
    return [sys.executable, __file__, "--framework", framework, "--batch", str(args.batch),
            "--length", str(args.length), "--steps", str(args.steps)]


def child(args) -> None:
    if args.framework == "torch":
        result = run_torch(args.batch, args.length, args.steps)
    else:
        result = run_jax(args.batch, args.length, args.steps, args.framework == "jax-chunked")
    tokens = args.batch * args.length
    result.update(batch=args.batch, length=args.length, tokens_per_s=round(tokens / result["seconds"], 1),
                  peak_rss_gib=round(peak_rss_gib(), 3),
                  gflops_per_s=round(tokens * model_flops_per_token(SMOLLM2, args.length) /
                                     result["seconds"] / 1e9, 1))
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--framework", choices=["torch", "jax", "jax-chunked"])
    args = parser.parse_args()
    if args.framework:
        child(args)
        return
    print_table(run_rounds(args, FRAMEWORKS, child_command))


def run_rounds(args, frameworks, child_command) -> list[list[dict]]:
    """Runs every framework's child process once per round; rounds interleave them because
    the machine is shared and noisy. Returns the JSON results, round by round."""
    rounds = []
    for _ in range(args.repeats):
        results = []
        for framework in frameworks:
            out = subprocess.run(child_command(args, framework), check=True, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(out.stdout.strip().splitlines()[-1], flush=True)
        rounds.append(results)
    return rounds


def print_table(rounds: list[list[dict]]) -> None:
    """Per framework: median tokens/s and peak RSS over rounds, and the median of the
    per-round ratios to PyTorch (each ratio from runs taken minutes apart)."""
    print(f"\n{len(rounds)} round(s); medians")
    print("| run | tokens/s | ratio to PyTorch | peak RSS GiB | ratio | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for index in range(len(rounds[0])):
        runs = [r[index] for r in rounds]
        speed = [r[index]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rounds]
        memory = [r[index]["peak_rss_gib"] / r[0]["peak_rss_gib"] for r in rounds]
        print(f"| {runs[0]['framework']} | {np.median([r['tokens_per_s'] for r in runs]):.1f} | "
              f"{np.median(speed):.2f}x | {np.median([r['peak_rss_gib'] for r in runs]):.2f} | "
              f"{np.median(memory):.2f}x | {np.median([r['gflops_per_s'] for r in runs]):.1f} |")


if __name__ == "__main__":
    main()
