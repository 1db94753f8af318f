"""mcckd-eval SOURCE --test [NAME=]FILE ...: decode and score a student on question files.

SOURCE is a training run directory (its config.yaml and checkpoints; the latest step, or
--step) or a training config YAML (its student as training would start: the Hugging Face
checkpoint it names, or its random initialisation, reported as step 0).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import time

from mcckd_jax import config as config_lib
from mcckd_jax import files
from mcckd_jax.cli import process

log = logging.getLogger("mcckd-eval")


def _dataset(role: str):
    def parse(text: str):
        from mcckd_jax.eval.runner import EvalDataset

        name, _, path = text.rpartition("=")
        return EvalDataset(name=name or pathlib.Path(path).stem, path=path, role=role)
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcckd-eval", description=__doc__.split(":", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: mcckd-eval runs/tiny --dev dev=data/dev.json --test gsm8k=test.jsonl "
               "--test svamp=svamp_test.json --watch")
    parser.add_argument("source", help="run directory, or a training config YAML")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value overrides of the run's config (e.g. mesh.per_host)")
    parser.add_argument("--dev", action="append", default=[], type=_dataset("dev"),
                        metavar="[NAME=]FILE", help="a dev set: the only kind best.json chooses by")
    parser.add_argument("--test", action="append", default=[], type=_dataset("test"),
                        metavar="[NAME=]FILE", help="a test set (several: in- and out-of-domain)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--watch", action="store_true",
                        help="evaluate each new checkpoint as training writes it; stops after "
                             "the run's last step or on SIGTERM")
    parser.add_argument("--poll_seconds", type=float, default=10.0)
    parser.add_argument("--output_dir", help="default: <run>/eval (<config run.output_dir>/eval)")
    parser.add_argument("--batch_size", type=int, default=16, help="questions per batch and process")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--num_samples", type=int, default=1,
                        help="self-consistency: majority vote over this many samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_questions", type=int, help="only the first N of each file")
    parser.add_argument("--no_progress_bar", action="store_true")
    parser.add_argument("--log_level", default="WARNING",
                        help="Python logging level (INFO: which checkpoint, where results go)")
    return parser


class _Stop:
    """Set by SIGTERM/SIGINT; evaluation stops between batches and writes nothing partial.
    The process then exits with 128 + the signal's number, as a shell reports a process the
    signal ended: a scheduler must not take a stopped evaluation for a finished one."""

    def __init__(self):
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __call__(self, signum, frame):
        del frame
        log.warning("received signal %d: stopping", signum)
        self.signal = signum

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.2, seconds))


def _configs(args: argparse.Namespace, config_path: pathlib.Path, datasets: tuple):
    """(the training config of the source, the EvalConfig of the flags)."""
    from mcckd_jax.eval import decoding, runner
    from mcckd_jax.train.config import TrainConfig

    train_config = config_lib.load(TrainConfig, config_path, args.overrides)
    eval_config = runner.EvalConfig(
        datasets=datasets, batch_size=args.batch_size, num_samples=args.num_samples,
        sampling=decoding.SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                                         max_new_tokens=args.max_new_tokens),
        seed=args.seed, max_questions=args.max_questions, progress_bar=not args.no_progress_bar)
    return train_config, eval_config


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may follow the flags
    process.go_offline()
    try:
        process.setup_logging(args.log_level)
    except ValueError as error:
        print(f"mcckd-eval: {error}", file=sys.stderr)
        return 2
    datasets = tuple(args.dev + args.test)
    if not datasets:
        print("mcckd-eval: give at least one --dev or --test file", file=sys.stderr)
        return 2

    from mcckd_jax import distributed
    from mcckd_jax.data.records import RecordError
    from mcckd_jax.models.hf_import import CheckpointError

    source = pathlib.Path(args.source)
    is_run = source.is_dir()
    try:
        train_config, eval_config = _configs(args, source / "config.yaml" if is_run else source,
                                             datasets)
    except (config_lib.ConfigError, FileNotFoundError, ValueError) as error:
        print(f"mcckd-eval: {error}", file=sys.stderr)
        return 2
    if (args.watch or args.step is not None) and not is_run:
        print(f"mcckd-eval: --watch and --step need a run directory, not {source}",
              file=sys.stderr)
        return 2
    distributed.initialize_from_environment()

    from mcckd_jax.eval.session import EvalSession

    output_dir = pathlib.Path(args.output_dir or
                              (source if is_run else pathlib.Path(train_config.run.output_dir))
                              / "eval")
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        files.check_writable_directory(output_dir, "--output_dir")
        session = EvalSession(train_config, eval_config, output_dir=output_dir,
                              run_dir=source if is_run else None, should_stop=lambda: stop.requested)
        if args.watch:
            session.watch(poll=stop.sleep, poll_seconds=args.poll_seconds)
        elif is_run:
            session.evaluate_checkpoint(args.step)
        else:
            session.evaluate_initial()
    except (RecordError, CheckpointError, ValueError, OSError) as error:
        print(f"mcckd-eval: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stop.signal is None else 128 + stop.signal


if __name__ == "__main__":
    sys.exit(main())
