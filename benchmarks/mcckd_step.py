"""One MCC-KD training step for SmolLM2-135M (K = 2): ours (JAX) vs the same step in PyTorch.

Run by hand (not a test):

    python benchmarks/mcckd_step.py --questions 4 --length 256 --steps 5

The PyTorch step is what the authors' code does, written for transformers: LlamaForCausalLM
forward over all B*K sequences, full-vocabulary logits, masked token cross-entropy, the
bidirectional KL at the answer-span positions, backward, AdamW. Ours is `mcckd_jax.train.step`
(chunked CE of 256 tokens from hidden states, span-only logits, donated state; "jax-remat"
runs the layers as a rematerialised scan) with the same batch, both in float32 on all cores.
Each runs in its own process so peak RSS is its own; both hand freed heap pages back to the
OS before the timed steps (`host_memory.release_free_heap`, as the training loop does after
compiling). Random weights (the speed does not depend on them); architecture of SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_step import SMOLLM2, model_flops_per_token, print_table, run_rounds  # noqa: E402

from mcckd_jax import host_memory  # noqa: E402

CHUNK_SIZE = int(os.environ.get("MCCKD_BENCH_CHUNK", "256"))  # tokens per cross-entropy chunk


def synthetic_batch(questions: int, views: int, length: int, span: int, vocab: int) -> dict:
    """A batch in the layout of the batch contract (README): prompt 64 tokens, answer span near each end."""
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
    from jax.sharding import NamedSharding, PartitionSpec

    from mcckd_jax import sharding
    from mcckd_jax.models import pretrained
    from mcckd_jax.train import optimizer, state as train_state, step as train_step

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
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    arrays = jax.device_put(batch, batch_sharding)
    with sharding.activate(mesh):
        compiled = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                           out_shardings=(shardings, None), donate_argnums=0).lower(
                               state, arrays).compile()
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


def child_command(args, framework: str) -> list[str]:
    return [sys.executable, __file__, "--framework", framework, "--questions",
            str(args.questions), "--length", str(args.length), "--steps", str(args.steps)]


def child(args) -> None:
    batch = synthetic_batch(args.questions, 2, args.length, 4, SMOLLM2["vocab_size"])
    result = {"framework": args.framework}
    if args.framework == "torch":
        import torch

        result["seconds"] = run_torch(batch, args.steps)
        result["threads"] = torch.get_num_threads()
    else:
        result["seconds"], result["compiled_temp_gib"] = run_jax(
            batch, args.steps, "full" if args.framework == "jax-remat" else "none")
    tokens = args.questions * 2 * args.length
    result.update(tokens=tokens, tokens_per_s=round(tokens / result["seconds"], 1),
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                  gflops_per_s=round(tokens * model_flops_per_token(SMOLLM2, args.length)
                                     / result["seconds"] / 1e9, 1))
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--framework", choices=["torch", "jax", "jax-remat"])
    args = parser.parse_args()
    if args.framework:
        child(args)
        return
    print_table(run_rounds(args, FRAMEWORKS, child_command))


if __name__ == "__main__":
    main()
