"""The README's table of configs at the paper's scale and today's: each planned with mcckd-plan
on the topology its header names, one process after another, then rendered as Markdown.

    python benchmarks/plan_configs.py --output_dir plans/            # plan all, print the table
    python benchmarks/plan_configs.py --output_dir plans/ --render    # the table from plans/*.json

TPU targets need libtpu (pip install -e ".[tpu]"); the GPU target needs JAX's CUDA plugin, in an
environment of its own (pip install -e ".[plan-gpu]"): give its python with --gpu_python.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30

# (label, config, topology, overrides): the paper's students, then today's.
PLANS = [
    ("LLaMA-7B LoRA", "llama7b_lora_gsm8k", "v5e-8", []),
    ("LLaMA-7B full", "llama7b_full_gsm8k", "v5p-8", []),
    ("LLaMA-13B LoRA", "llama13b_lora_gsm8k", "v5e-8", []),
    ("LLaMA-13B full", "llama13b_lora_gsm8k", "v5e-8", ["student.lora=null"]),
    ("FlanT5-XL full", "flan_t5_xl_gsm8k", "v5e-8", []),
    ("FlanT5-XXL full", "flan_t5_xxl_gsm8k", "v5p-8", []),
    ("Llama-3.1-8B LoRA", "llama3_1_8b_lora_gsm8k", "h100:8", []),
    ("Qwen2.5-7B LoRA", "qwen2_5_7b_lora_gsm8k", "v5e-8", []),
    ("Qwen3-1.7B full", "qwen3_1_7b_full_gsm8k", "v6e-4", []),
    ("Gemma-2-2B full", "gemma2_2b_full_gsm8k", "v5e-8", []),
]


def _file(output_dir: pathlib.Path, config: str, overrides: list[str]) -> pathlib.Path:
    suffix = "_full" if "student.lora=null" in overrides else ""
    return output_dir / f"{config}{suffix}.json"


def plan_all(output_dir: pathlib.Path, gpu_python: str | None) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for label, config, topology, overrides in PLANS:
        gpu = topology.split(":")[0] in ("h100", "h200", "a100")
        python = gpu_python if gpu else sys.executable
        if python is None:
            print(f"{label}: skipped (--gpu_python not given)", file=sys.stderr)
            continue
        start = time.perf_counter()
        done = subprocess.run([python, "-m", "mcckd_jax.cli.plan", f"configs/{config}.yaml",
                               *overrides, "--topology", topology, "--output",
                               str(_file(output_dir, config, overrides))],
                              cwd=REPO, capture_output=True, text=True)
        print(f"{label} on {topology}: exit {done.returncode} in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


def _peak(plan: dict, program: str) -> str:
    memory = plan["memory_per_device"].get(program)
    return f"{memory['peak'] / GIB:.2f}" if memory else "-"


def render(output_dir: pathlib.Path) -> str:
    rows = ["| student | config | topology | weights + optimizer (GiB/device) | train step "
            "peak | decoding peak | of | fits | estimate (40% MFU) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, config, topology, overrides in PLANS:
        path = _file(output_dir, config, overrides)
        if not path.exists():
            continue
        plan = json.loads(path.read_text())
        memory = plan["memory_per_device"]
        state = (memory["weights"] + memory["optimizer"]) / GIB
        estimate = plan.get("flops", {}).get("estimate")
        estimated = (f"{estimate['step_seconds']:.2f} s/step, "
                     f"{estimate['tokens_per_second']:,.0f} positions/s" if estimate else "-")
        fits = "yes" if plan["fits"] else "no: " + _suggestion(plan)
        command = " ".join([f"`{config}`", *(f"`{o}`" for o in overrides)])
        rows.append(f"| {label} | {command} | {topology} | {state:.2f} "
                    f"| {_peak(plan, 'train_step')} | {_peak(plan, 'decoding')} "
                    f"| {memory['budget'] / GIB:.1f} | {fits} | {estimated} |")
    return "\n".join(rows)


def _suggestion(plan: dict) -> str:
    suggestion = plan.get("suggestion")
    if not suggestion:
        return plan.get("reason", "")
    peak = max(suggestion["plan"]["memory_per_device"].get(name, {}).get("peak", 0)
               for name in ("train_step", "decoding"))
    return f"{suggestion['change']} fits (peak {peak / GIB:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="plans")
    parser.add_argument("--render", action="store_true", help="only render existing plans")
    parser.add_argument("--gpu_python", default=None,
                        help="a python whose environment has the plan-gpu extra")
    args = parser.parse_args()
    output_dir = pathlib.Path(args.output_dir)
    if not args.render:
        plan_all(output_dir, args.gpu_python)
    print(render(output_dir))


if __name__ == "__main__":
    main()
