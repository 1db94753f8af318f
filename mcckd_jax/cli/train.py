"""mcckd-train CONFIG.yaml [dotted.key=value ...]: train a student with MCC-KD."""

from __future__ import annotations

import argparse
import logging
import sys

from mcckd_jax import config as config_lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mcckd-train", description=__doc__.split(":", 1)[1].strip(),
        epilog="Example: mcckd-train configs/tiny.yaml run.steps=20 objective.alpha=0.5")
    parser.add_argument("config", help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--log_level", default="INFO", help="Python logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

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
        train(config)
    except (NonFiniteLoss, RecordError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"mcckd-train: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
