"""One MCC-KD training step for SmolLM2-135M (K = 2): ours (JAX) vs the same step in PyTorch.

Run by hand (not a test):

    python benchmarks/mcckd_step.py                        # the sweep: lengths 128 ... 1024
    python benchmarks/mcckd_step.py --lengths 256 --questions 4 --repeats 3

The sweep keeps about 2,048 tokens per step (questions = 2048 // (2 * length), at least one),
runs every (length, framework) in its own process, interleaved, and prints the host (CPU
model, AVX-512 or AVX2, cores, versions) above the table: XLA's CPU speed depends on the ISA.

The PyTorch step is what the authors' code does, written for transformers: LlamaForCausalLM
forward over all B*K sequences, full-vocabulary logits, masked token cross-entropy, the
bidirectional KL at the answer-span positions, backward, AdamW. Ours is `mcckd_jax.train.step`
(chunked CE of 256 tokens from hidden states, span-only logits, donated state, compiled as the
training loop compiles it; "jax-remat" runs the layers as a rematerialised scan) with the same
batch, both in float32 on all cores.
Each runs in its own process so peak RSS is its own; both hand freed heap pages back to the
OS before the timed steps (`host_memory.release_free_heap`, as the training loop does after
compiling). Random weights (the speed does not depend on them); architecture of SmolLM2-135M.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_step import SMOLLM2, model_flops_per_token  # noqa: E402

from mcckd_jax import host_memory  # noqa: E402

CHUNK_SIZE = int(os.environ.get("MCCKD_BENCH_CHUNK", "256"))  # tokens per cross-entropy chunk


def synthetic_batch(questions: int, views: int, length: int, span: int, vocab: int) -> dict:
    """A batch in the layout of the batch contract (README): prompt 64 tokens, answer span
    near each end."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, (questions, views, length)).astype(np.int32)
    loss_mask = np.ones((questions, views, length), bool)
    loss_mask[:, :, :64] = False
    span_positions = np.stack([np.arange(length - 20 - 7 * k, length - 20 - 7 * k + span)
                               for k in range(views)])[None].repeat(questions, 0).astype(np.int32)
    return dict(tokens=tokens, targets=np.roll(tokens, -1, axis=2), loss_mask=loss_mask,
                rationale_mask=np.ones((questions, views), bool), span_positions=span_positions,
                span_mask=np.ones((questions, span), bool))


def run_torch(batch: dict, steps: int) -> float:
    import torch
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b = {k: torch.from_numpy(v) for k, v in batch.items()}
    questions, views, length = b["tokens"].shape

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=b["tokens"].reshape(-1, length).long()).logits.float()
        logits = logits.reshape(questions, views, length, -1)
        nll = F.cross_entropy(logits.flatten(0, 2), b["targets"].flatten().long(), reduction="none")
        mask = b["loss_mask"].flatten().float()
        ce = (nll * mask).sum() / mask.sum()
        index = b["span_positions"].long()[..., None].expand(-1, -1, -1, logits.shape[-1])
        span = torch.gather(logits, 2, index)  # [B, K, S, V]
        log_p, log_q = F.log_softmax(span[:, 0], -1), F.log_softmax(span[:, 1], -1)
        kl = 0.5 * (F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
                    + F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)).mean()
        (ce + kl).backward()
        optimizer.step()
        return float(ce)

    step()
    host_memory.release_free_heap()  # as for ours, so both are measured the same way
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def run_jax(batch: dict, steps: int, remat: str) -> tuple[float, float]:
    import jax

    from mcckd_jax import sharding
    from mcckd_jax.models import pretrained
    from mcckd_jax.train import compilation, optimizer, state as train_state, step as train_step

    mesh = sharding.make_mesh((-1, 1, 1))
    student = pretrained.StudentConfig(preset="smollm2_135m", remat_policy=remat)
    model = pretrained.build_student(student, mesh=mesh)
    config = optimizer.OptimizerConfig(learning_rate=1e-5, warmup_steps=0, max_grad_norm=None)
    tx = optimizer.make_optimizer(config, 1000)
    graphdef, state, shardings = train_state.create_train_state(model, tx, mesh=mesh)
    del model
    objective = train_step.ObjectiveConfig(chunk_size=CHUNK_SIZE)
    step_fn = train_step.make_train_step(graphdef, tx, objective,
                                         optimizer.learning_rate_schedule(config, 1000))
    batch_sharding = sharding.batch_sharding(mesh)
    arrays = jax.device_put(batch, batch_sharding)
    with sharding.activate(mesh):
        # As the training loop compiles it (train/compilation.py: the CPU options included).
        compiled = compilation.compile_train_step(
            jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, None), donate_argnums=0), state, arrays)
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
    host_memory.release_free_heap()  # what the training loop does after each compilation
    state, metrics = compiled(state, arrays)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, arrays)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps, temp


FRAMEWORKS = ("torch", "jax", "jax-remat")
SWEEP = (128, 256, 384, 512, 768, 1024)
TOKENS_PER_STEP = 2048  # the sweep's batch: questions = max(1, 2048 // (2 * length))


def host() -> dict:
    """The machine a number comes from: CPU model, its widest vector ISA, cores, versions."""
    import platform

    flags, model = set(), platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else
           "no AVX2" if flags else "unknown")
    import jax
    import torch

    return {"cpu": model, "isa": isa, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def child_command(args, framework: str, length: int, questions: int) -> list[str]:
    return [sys.executable, __file__, "--framework", framework, "--questions", str(questions),
            "--lengths", str(length), "--steps", str(args.steps), "--remat_policy",
            args.remat_policy]


def child(args) -> None:
    length = args.lengths[0]
    batch = synthetic_batch(args.questions, 2, length, 4, SMOLLM2["vocab_size"])
    result = {"framework": args.framework, "length": length, "questions": args.questions}
    if args.framework == "torch":
        import torch

        result["seconds"] = run_torch(batch, args.steps)
        result["threads"] = torch.get_num_threads()
    else:
        result["seconds"], result["compiled_temp_gib"] = run_jax(
            batch, args.steps, args.remat_policy if args.framework == "jax-remat" else "none")
        result["remat_policy"] = args.remat_policy if args.framework == "jax-remat" else "none"
    tokens = args.questions * 2 * length
    result.update(tokens=tokens, tokens_per_s=round(tokens / result["seconds"], 1),
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                  gflops_per_s=round(tokens * model_flops_per_token(SMOLLM2, length)
                                     / result["seconds"] / 1e9, 1))
    print(json.dumps(result), flush=True)


def sweep(args) -> list[dict]:
    """Every (round, length, framework) in its own process, interleaved: lengths within a
    round, frameworks within a length, so that a noisy minute hits all of them alike."""
    results = []
    for _ in range(args.repeats):
        for length in args.lengths:
            questions = args.questions or max(1, TOKENS_PER_STEP // (2 * length))
            for framework in FRAMEWORKS:
                out = subprocess.run(child_command(args, framework, length, questions),
                                     check=True, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    return results


def print_sweep(results: list[dict], machine: dict) -> None:
    """Per length: medians over rounds of tokens/s, peak RSS and each one's ratio to PyTorch
    (ratios taken within a round)."""
    print(f"\nhost: {machine['cpu']}, {machine['isa']}, {machine['cores']} cores; jax "
          f"{machine['jax']}, torch {machine['torch']}; XLA_FLAGS={machine['xla_flags']!r}")
    print("| length | questions | PyTorch tokens/s | ours | ratio | ours, remat | ratio | "
          "peak RSS PyTorch GiB | ours | remat |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by = {}
    for r in results:
        by.setdefault((r["length"], r["framework"]), []).append(r)
    for length in sorted({r["length"] for r in results}):
        runs = {f: by[(length, f)] for f in FRAMEWORKS}
        med = lambda f, key: float(np.median([r[key] for r in runs[f]]))  # noqa: E731
        ratio = lambda f, key: float(np.median([a[key] / b[key] for a, b in  # noqa: E731
                                                zip(runs[f], runs["torch"])]))
        speed, memory = "tokens_per_s", "peak_rss_gib"
        print(f"| {length} | {runs['torch'][0]['questions']} | {med('torch', speed):.1f} | "
              f"{med('jax', speed):.1f} | {ratio('jax', speed):.2f}x | "
              f"{med('jax-remat', speed):.1f} | {ratio('jax-remat', speed):.2f}x | "
              f"{med('torch', memory):.2f} | {ratio('jax', memory):.2f}x | "
              f"{ratio('jax-remat', memory):.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(SWEEP))
    parser.add_argument("--questions", type=int, default=None,
                        help=f"per step (default: {TOKENS_PER_STEP} tokens per step)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--remat_policy", default="mlp",
                        help="of the jax-remat run: none, full, mlp (what "
                             "configs/smollm2_135m_gsm8k.yaml trains with), dots, dots_saveable")
    parser.add_argument("--framework", choices=FRAMEWORKS)
    args = parser.parse_args()
    if args.framework:
        child(args)
        return
    machine = host()
    print(json.dumps({"host": machine}), flush=True)
    print_sweep(sweep(args), machine)


if __name__ == "__main__":
    main()
