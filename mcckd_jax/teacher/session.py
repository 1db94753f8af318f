"""An mcckd-teacher run from its config: the teacher, the questions, the cache, the outputs.

Only process 0 writes (the output JSON and its report, together or not at all); with a local
teacher on several processes every process takes part in decoding.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from mcckd_jax import files
from mcckd_jax.data import records
from mcckd_jax.teacher import api, cache, prompts
from mcckd_jax.teacher import run as teacher_run

EXPECTED_ERRORS = (records.RecordError, prompts.PromptError, cache.CacheError,
                   api.TeacherError, ValueError, OSError)


def _check(config) -> None:
    if not config.questions:
        raise ValueError("no question files: give them as arguments (or `questions` in the config)")
    if not config.output:
        raise ValueError("--output is required: the MCC-KD JSON file to write")
    uses_api = config.api.base_url is not None or config.api.model is not None
    uses_local = config.local.checkpoint is not None
    if uses_api == uses_local:
        raise ValueError("choose one teacher: --base_url and --model (an API endpoint) or "
                         "--checkpoint (a local model)")
    if uses_api and (config.api.base_url is None or config.api.model is None):
        raise ValueError("an API teacher needs both --base_url and --model")


def build_teacher(config):
    """The API or local teacher the config names."""
    if config.local.checkpoint is None:
        settings = config.api
        prices = None
        if settings.price_in is not None or settings.price_out is not None:
            prices = (settings.price_in or 0.0, settings.price_out or 0.0)
        per_request = (settings.samples_per_request if settings.samples_per_request == "auto"
                       else int(settings.samples_per_request))
        return api.ApiTeacher(settings.base_url, settings.model,
                              api_key_env=settings.api_key_env,
                              concurrency=settings.concurrency, timeout_s=settings.timeout_s,
                              max_attempts=settings.max_attempts,
                              samples_per_request=per_request, prices=prices)
    from mcckd_jax import distributed, sharding
    from mcckd_jax.teacher import local

    distributed.initialize_from_environment()
    mesh = sharding.make_mesh(config.local.per_host)
    return local.LocalTeacher(config.local.checkpoint, gguf_file=config.local.gguf_file,
                              mesh=mesh, batch_size=config.local.batch_size)


def _progress_bar(enabled: bool):
    if not enabled:
        return None, None
    import tqdm

    bar = tqdm.tqdm(unit="sample", dynamic_ncols=True)
    tokens = [0]

    def update(sample):
        tokens[0] += sample.completion_tokens
        rate = bar.format_dict.get("rate") or 0.0
        bar.set_postfix({"tok/sample": f"{tokens[0] / max(bar.n + 1, 1):.0f}",
                         "samples/s": f"{rate:.2f}"}, refresh=False)
        bar.update(1)

    return bar, update


def run(config, *, progress_bar: bool = True) -> dict[str, Any]:
    """Runs the teacher over the questions and writes the output and its report; returns the
    one-line summary printed by the command."""
    _check(config)
    template = prompts.load_prompt(config.prompt, config.task)
    read = records.read_records(list(config.questions), require_rationales=False)
    teacher = build_teacher(config)
    output = pathlib.Path(config.output)
    cache_dir = pathlib.Path(config.cache) if config.cache else pathlib.Path(f"{output}.cache")
    writer = _is_writer()
    bar, update = _progress_bar(progress_bar and writer)
    try:
        # One process appends to the cache; the others read it and keep their samples in
        # memory (every process of a local teacher passes the same requests).
        with cache.SampleCache(cache_dir, read_only=not writer) as store:
            result = teacher_run.run_teacher(read.records, teacher, store, task=config.task,
                                     template=template, params=config.sampling,
                                     num_samples=config.num_samples, adaptive=config.adaptive,
                                     progress=update)
    finally:
        if bar is not None:
            bar.close()
    report = {**result.report, "questions_files": list(config.questions), "output": str(output),
              "cache": str(cache_dir), "prompt": config.prompt}
    if writer:
        files.write_together({output: json.dumps(result.rows, indent=1, ensure_ascii=False) + "\n",
                              pathlib.Path(f"{output}.report.json"):
                                  json.dumps(report, indent=2) + "\n"})
    return {key: report[key] for key in ("questions", "samples", "samples_from_cache",
                                         "samples_new", "completion_tokens", "wall_seconds")}


def _is_writer() -> bool:
    import sys

    if "jax" not in sys.modules:  # an API run never loads JAX: a single process
        return True
    import jax

    return jax.process_index() == 0
