"""mcckd-train CONFIG.yaml [dotted.key=value ...]: train a student with MCC-KD."""

from __future__ import annotations

import argparse
import sys

from mcckd_jax import config as config_lib
from mcckd_jax.cli import process


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when the run reached run.steps, 128 + the signal's number when a signal
    stopped it after saving a checkpoint (a preempted job is not a finished one), 1 for an
    error during the run, 2 for a bad config or command line."""
    parser = argparse.ArgumentParser(
        prog="mcckd-train", description=__doc__.split(":", 1)[1].strip(),
        epilog="Example: mcckd-train configs/tiny.yaml run.steps=20 objective.alpha=0.5")
    parser.add_argument("config", help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--log_level", default="WARNING",
                        help="Python logging level (INFO: data report, compiled memory, restores)")
    args = parser.parse_intermixed_args(argv)  # key=value after a flag too
    process.go_offline()
    try:
        process.setup_logging(args.log_level)
    except ValueError as error:
        print(f"mcckd-train: {error}", file=sys.stderr)
        return 2

    from mcckd_jax import distributed  # imports JAX: after argument parsing, for a fast --help
    from mcckd_jax.train.config import TrainConfig

    try:
        config = config_lib.load(TrainConfig, args.config, args.overrides)
    except (config_lib.ConfigError, FileNotFoundError) as error:
        print(f"mcckd-train: {error}", file=sys.stderr)
        return 2
    distributed.initialize_from_environment()

    from mcckd_jax.data.records import RecordError
    from mcckd_jax.models.hf_import import CheckpointError
    from mcckd_jax.train.loop import NonFiniteLoss, train

    try:
        result = train(config)
    except (NonFiniteLoss, RecordError, CheckpointError, ValueError, OSError) as error:
        print(f"mcckd-train: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0 if result.stopped_by_signal is None else 128 + result.stopped_by_signal


if __name__ == "__main__":
    sys.exit(main())
