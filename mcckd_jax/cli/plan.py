"""mcckd-plan CONFIG.yaml [key=value ...] --topology T: the per-device memory, FLOPs and a
step-time estimate of a training config on a target, compiled without the target's hardware
and without weights."""

from __future__ import annotations

import argparse
import json
import sys

from mcckd_jax.cli import process

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error of the command."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="mcckd-plan", description=__doc__.split(":", 1)[1].strip(),
        epilog="Example: mcckd-plan configs/llama7b_lora_gsm8k.yaml --topology v5e-8")
    parser.add_argument("config", help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--topology", required=True,
                        help="v5e-8, v4-16, v5p-8, v6e-16 (Cloud TPU names), v5e:2x4 (a shape), "
                             "or cpu:N (N forced CPU devices on this machine)")
    parser.add_argument("--hosts", type=int, default=None,
                        help="processes of the run (default: the topology's hosts; cpu: 1); "
                             "the global batch is data.pipeline.batch_size x hosts")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation assumed by the step-time estimate")
    parser.add_argument("--memory_gib", type=float, default=None,
                        help="memory per device to plan against, in GiB (default: the chip's "
                             "HBM; cpu: this machine's memory over the devices)")
    parser.add_argument("--output", default=None, help="also write the plan as JSON here")
    parser.add_argument("--no_decoding", action="store_true",
                        help="plan the train step only (not the eval decoding program)")
    parser.add_argument("--no_advice", action="store_true",
                        help="when it does not fit, do not search for a setting that does")
    parser.add_argument("--log_level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when the config fits, 1 when it does not, 2 for bad input."""
    args = _parser().parse_intermixed_args(argv)
    from mcckd_jax.plan import topology  # no JAX yet: the environment is set first

    try:
        target = topology.parse_target(args.topology)
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
        if args.memory_gib is not None and not args.memory_gib > 0:
            raise ValueError(f"--memory_gib must be > 0, got {args.memory_gib}")
        if args.hosts is not None and args.hosts < 1:
            raise ValueError(f"--hosts must be >= 1, got {args.hosts}")
        topology.prepare_environment(target)
        process.go_offline()
        process.setup_logging(args.log_level)
        return _run(args, target)
    except ValueError as error:
        print(f"mcckd-plan: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args, target) -> int:
    from mcckd_jax import config as config_lib
    from mcckd_jax import files, sharding
    from mcckd_jax.models.hf_import import CheckpointError
    from mcckd_jax.plan import advice, report, topology
    from mcckd_jax.train.config import TrainConfig

    try:
        config = config_lib.load(TrainConfig, args.config, args.overrides)
    except (config_lib.ConfigError, FileNotFoundError) as error:
        raise ValueError(str(error)) from None
    devices = topology.target_devices(target)
    hosts = args.hosts or len({device.process_index for device in devices})

    def make_setting(config):
        mesh = sharding.make_mesh(config.mesh.per_host, config.mesh.across_hosts,
                                  devices=devices)
        budget = None if args.memory_gib is None else int(args.memory_gib * 2**30)
        return report.Setting(config, target, mesh, hosts, args.mfu, budget)

    try:
        setting = make_setting(config)
        result = report.plan(setting, decoding=not args.no_decoding)
        result["config"] = {"file": args.config, "overrides": list(args.overrides)}
        if not result["fits"] and not args.no_advice:
            result["suggestion"] = advice.advise(setting, make_setting,
                                                 result.get("largest", "train step"))
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    print(report.render(result))
    if args.output:
        files.write_atomically(args.output, json.dumps(result, indent=2, default=str) + "\n")
    if result["fits"]:
        return 0
    print(f"mcckd-plan: {args.config} does not fit {target.name}: {result['reason']}; "
          f"{_suggestion(result.get('suggestion'), args.no_advice)}", file=sys.stderr)
    return EXIT_DOES_NOT_FIT


def _suggestion(suggestion, skipped: bool) -> str:
    from mcckd_jax.plan import report

    if skipped:
        return "run without --no_advice for a setting that fits"
    if suggestion is None:
        return "no single change tried fits (see the plan); more devices are needed"
    plan = suggestion["plan"]
    peak = max(plan["memory_per_device"].get(name, {}).get("peak", 0)
               for name in ("train_step", "decoding"))
    return (f"{suggestion['change']} fits ({' '.join(suggestion['overrides'])}: peak "
            f"{report.size(peak)} of {report.size(plan['memory_per_device']['budget'])} "
            "per device)")


if __name__ == "__main__":
    sys.exit(main())
