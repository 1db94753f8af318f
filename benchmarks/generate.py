"""Generated tokens/s: our jitted KV-cache `generate` vs transformers `generate` (PyTorch).

Run by hand (not a test), from the repository root with ../shared beside it:

    python benchmarks/generate.py --batches 1 8 16 32 --new-tokens 64 --repeats 3

Both decode the same SmolLM2-135M architecture (random weights: speed does not depend on
their values, and neither side stops at EOS: transformers gets min_new_tokens = N, ours an
empty EOS set) greedily, in float32, on all cores, from the same prompts: the first B GSM8K
test questions in the project's prompt template, tokenized with the SmolLM2 tokenizer and
left-padded to the longest. Ours pads them further to a 32-token bucket, as the eval runner
does. Each (framework, batch) runs in its own process, interleaved in rounds because the
machine is shared; a call's time includes the prompt prefill, and the first call (our
compilation) is not timed. Prints one JSON line per run and a table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# This checkout's package, not whichever one is installed in the environment.
sys.path[:0] = [str(REPO_ROOT), os.path.dirname(os.path.abspath(__file__))]
from model_step import SMOLLM2, matmul_params  # noqa: E402
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"  # data.tokenization.DEFAULT_PROMPT_TEMPLATE
PAD_ID = 2  # SmolLM2's pad (= EOS) token
BUCKET = 32  # our prompt lengths are rounded up to a multiple of this


def decode_bytes_per_step(batch: int, cache_slots: int) -> float:
    """Bytes one decoding step must read: every weight once, plus the keys and values of
    every layer's cache (float32). Times the steps over the whole call (prefill included) it
    gives the `decode_gb_per_s` column, a lower bound on the decoding loop's bandwidth."""
    kv_width = SMOLLM2["num_key_value_heads"] * (SMOLLM2["hidden_size"]
                                                 // SMOLLM2["num_attention_heads"])
    cache = SMOLLM2["num_hidden_layers"] * 2 * batch * cache_slots * kv_width
    return 4 * (matmul_params(SMOLLM2) + cache)


def encode_prompts(shared: pathlib.Path, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids and mask [B, L] of the first B GSM8K test questions."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import hf_reference

    _, tokenizer = hf_reference.smollm2_hf()
    lines = (shared / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()
    texts = [PROMPT_TEMPLATE.format(question=json.loads(line)["question"])
             for line in lines[:batch]]
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="np", padding=True)
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


def run_torch(prompt_BL, mask_BL, new_tokens: int, calls: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).eval()
    inputs = dict(input_ids=torch.from_numpy(prompt_BL).long(),
                  attention_mask=torch.from_numpy(mask_BL).long())

    def call(num_new):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=num_new, min_new_tokens=num_new,
                                  do_sample=False, pad_token_id=PAD_ID)

    call(2)  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        out = call(new_tokens)
    seconds = (time.perf_counter() - start) / calls
    assert out.shape[1] - prompt_BL.shape[1] == new_tokens
    return dict(framework="transformers", threads=torch.get_num_threads(), seconds=seconds,
                prompt_length=prompt_BL.shape[1])


def run_jax(prompt_BL, mask_BL, new_tokens: int, calls: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".jax_cache"))
    from mcckd_jax import sharding
    from mcckd_jax.data.batching import bucket_for
    from mcckd_jax.eval.decoding import SamplingConfig, generate
    from mcckd_jax.models import decoder, llama

    batch, length = prompt_BL.shape
    padded = bucket_for(length, range(BUCKET, 8192 + BUCKET, BUCKET))
    prompt_BL = np.pad(prompt_BL, ((0, 0), (padded - length, 0)), constant_values=PAD_ID)
    mask_BL = np.pad(mask_BL, ((0, 0), (padded - length, 0)))
    mesh = sharding.make_mesh((-1, 1, 1))
    with sharding.activate(mesh):
        model = decoder.DecoderModel(llama.smollm2_135m(), rngs=nnx.Rngs(0))
        sampling = SamplingConfig(max_new_tokens=new_tokens)

        def call():
            return generate(model, jnp.asarray(prompt_BL), jnp.asarray(mask_BL),
                            sampling=sampling, eos_token_ids=(), pad_token_id=PAD_ID)

        compile_start = time.perf_counter()
        jax.block_until_ready(call())
        compile_seconds = time.perf_counter() - compile_start
        start = time.perf_counter()
        for _ in range(calls):
            out = jax.block_until_ready(call())
        seconds = (time.perf_counter() - start) / calls
    assert out.shape == (batch, new_tokens)
    return dict(framework="mcckd_jax", seconds=seconds, prompt_length=padded,
                first_call_seconds=round(compile_seconds, 1))


def child(args) -> None:
    with np.load(args.prompts) as prompts:
        prompt_BL, mask_BL = prompts["tokens"], prompts["mask"]
    run = run_torch if args.framework == "torch" else run_jax
    result = run(prompt_BL, mask_BL, args.new_tokens, args.calls)
    batch = prompt_BL.shape[0]
    steps_per_s = args.new_tokens / result["seconds"]
    slots = result["prompt_length"] + args.new_tokens
    result.update(batch=batch, new_tokens=args.new_tokens,
                  tokens_per_s=round(batch * args.new_tokens / result["seconds"], 1),
                  decode_gb_per_s=round(decode_bytes_per_step(batch, slots) * steps_per_s / 1e9, 1))
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2, help="timed generate calls per run")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--shared", type=pathlib.Path, default=REPO_ROOT.parent / "shared")
    parser.add_argument("--framework", choices=["torch", "jax"])
    parser.add_argument("--prompts", help="(child) .npz with tokens and mask")
    args = parser.parse_args()
    if args.framework:
        child(args)
        return
    results = {}  # (framework, batch) -> list of results, one per round
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for batch in args.batches:
            tokens, mask = encode_prompts(args.shared, batch)
            files[batch] = os.path.join(folder, f"prompts_{batch}.npz")
            np.savez(files[batch], tokens=tokens, mask=mask)
        for _ in range(args.repeats):
            for batch in args.batches:
                for framework in ("torch", "jax"):
                    command = [sys.executable, __file__, "--framework", framework, "--prompts",
                               files[batch], "--new-tokens", str(args.new_tokens),
                               "--calls", str(args.calls)]
                    out = subprocess.run(command, check=True, capture_output=True, text=True,
                                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
                    line = out.stdout.strip().splitlines()[-1]
                    print(line, flush=True)
                    results.setdefault((framework, batch), []).append(json.loads(line))
    print_table(results, args.batches)


def print_table(results: dict, batches) -> None:
    """Per batch: median tokens/s of each framework and the median of per-round ratios."""
    rounds = len(results[("torch", batches[0])])
    print(f"\n{rounds} round(s); medians")
    print("| batch | prompt tokens (ours) | transformers tokens/s | mcckd_jax tokens/s | ratio | "
          "mcckd_jax decode GB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in batches:
        torch_runs, jax_runs = results[("torch", batch)], results[("jax", batch)]
        ratios = [j["tokens_per_s"] / t["tokens_per_s"] for t, j in zip(torch_runs, jax_runs)]
        print(f"| {batch} | {torch_runs[0]['prompt_length']} ({jax_runs[0]['prompt_length']}) | "
              f"{np.median([r['tokens_per_s'] for r in torch_runs]):.1f} | "
              f"{np.median([r['tokens_per_s'] for r in jax_runs]):.1f} | "
              f"{np.median(ratios):.2f}x | "
              f"{np.median([r['decode_gb_per_s'] for r in jax_runs]):.1f} |")


if __name__ == "__main__":
    main()
