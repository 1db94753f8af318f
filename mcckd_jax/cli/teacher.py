"""mcckd-teacher: a question file -> several teacher rationales per question (MCC-KD JSON).

    mcckd-teacher questions.json --task svamp --num_samples 4 --output raw.json \
        --base_url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct   # an API teacher
    mcckd-teacher questions.json --task svamp --num_samples 4 --output raw.json \
        --checkpoint path/to/teacher [--gguf_file F]                             # a local teacher
    mcckd-prepare raw.json --task svamp --num_rationales 4 --output prepared.jsonl

Settings come from an optional YAML file (`--config`, fields of `TeacherConfig`), then dotted
`key=value` overrides, then the flags. Samples are cached in `--cache` (default:
<output>.cache/) as they land: a run started again after a kill asks for none of them again and
writes the same output. The API key is read from the environment variable `--api_key_env`
(default OPENAI_API_KEY; "" for servers without keys) and written nowhere. Bad input is one
line on stderr, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

from mcckd_jax import config as config_files
from mcckd_jax.cli import process
from mcckd_jax.teacher.base import SamplingParams
from mcckd_jax.teacher.run import AdaptiveConfig


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = None  # e.g. http://localhost:8000/v1 (vLLM, SGLang, llama.cpp)
    model: str | None = None  # the served model's name
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key; "" for none
    concurrency: int = 8  # requests in flight
    timeout_s: float = 60.0  # per request
    max_attempts: int = 8  # per request, retries included
    samples_per_request: str = "auto"  # "auto" (use n where the server honours it) or a count
    price_in: float | None = None  # USD per million prompt tokens, for the running cost
    price_out: float | None = None  # USD per million completion tokens


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """A checkpoint that load_pretrained reads, sampled with the project's decoder."""

    checkpoint: str | None = None  # local HF directory (safetensors) or folder with a GGUF
    gguf_file: str | None = None  # GGUF file inside `checkpoint`
    batch_size: int = 16  # rows per process and batch
    per_host: tuple[int, ...] = (-1, 1, 1)  # mesh sizes within a host (data, fsdp, tensor)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Everything mcckd-teacher needs."""

    questions: tuple[str, ...] = ()  # question files (any format the data readers accept)
    task: str = "gsm8k"  # answer format: gsm8k, svamp, asdiv, multiarith, csqa, strategyqa
    output: str | None = None  # MCC-KD JSON to write
    cache: str | None = None  # sample cache folder; default <output>.cache
    prompt: str = "zero_shot"  # template name in configs/prompts (zero_shot, few_shot) or a path
    num_samples: int = 4  # samples per question (per round under adaptive sampling)
    sampling: SamplingParams = SamplingParams()  # temperature, top_p, max_tokens, seed
    adaptive: AdaptiveConfig = AdaptiveConfig()  # keep sampling until enough are usable
    api: ApiConfig = ApiConfig()
    local: LocalConfig = LocalConfig()


_FLAGS = {  # flag -> (dotted field, type)
    "task": ("task", str), "output": ("output", str), "cache": ("cache", str),
    "prompt": ("prompt", str), "num_samples": ("num_samples", int),
    "temperature": ("sampling.temperature", float), "top_p": ("sampling.top_p", float),
    "max_tokens": ("sampling.max_tokens", int), "seed": ("sampling.seed", int),
    "base_url": ("api.base_url", str), "model": ("api.model", str),
    "api_key_env": ("api.api_key_env", str), "concurrency": ("api.concurrency", int),
    "timeout_s": ("api.timeout_s", float), "price_in": ("api.price_in", float),
    "price_out": ("api.price_out", float), "checkpoint": ("local.checkpoint", str),
    "gguf_file": ("local.gguf_file", str), "batch_size": ("local.batch_size", int),
    "adaptive_target": ("adaptive.target", int), "max_samples": ("adaptive.max_samples", int),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcckd-teacher", description=__doc__.split("\n")[0])
    parser.add_argument("questions", nargs="*", help="question files, and dotted key=value "
                        "overrides of the config (e.g. sampling.top_p=0.95)")
    parser.add_argument("--config", default=None, help="YAML file of TeacherConfig fields")
    for flag, (_, kind) in _FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, default=None)
    parser.add_argument("--log_level", default="WARNING")
    parser.add_argument("--no_progress_bar", action="store_true")
    return parser


def load_config(argv: Sequence[str] | None) -> tuple[TeacherConfig, argparse.Namespace]:
    """The config of a command line: file, then key=value overrides, then flags."""
    args = _parser().parse_intermixed_args(argv)
    files = [q for q in args.questions if "=" not in q]
    overrides = [q for q in args.questions if "=" in q]
    # JSON renders each value as the YAML scalar of its type ("" stays an empty string).
    overrides += [f"{field}={json.dumps(getattr(args, flag))}"
                  for flag, (field, _) in _FLAGS.items() if getattr(args, flag) is not None]
    if files:
        overrides.append("questions=[" + ",".join(json.dumps(f) for f in files) + "]")
    return config_files.load(TeacherConfig, args.config, overrides), args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, args = load_config(argv)
    except (config_files.ConfigError, ValueError, OSError) as error:
        print(f"mcckd-teacher: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    process.go_offline()
    process.setup_logging(args.log_level)
    from mcckd_jax.teacher import session  # JAX and the clients load only for a real run

    try:
        summary = session.run(config, progress_bar=not args.no_progress_bar)
    except session.EXPECTED_ERRORS as error:
        print(f"mcckd-teacher: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def default_cache(output: str) -> pathlib.Path:
    return pathlib.Path(f"{output}.cache")


if __name__ == "__main__":
    sys.exit(main())
