"""The ``rayfine`` command line.

    rayfine validate resnet18_digits --set train.lr=3e-4
    rayfine train resnet18_digits --runs-dir runs

Heavy imports (torch, ray) happen inside the command functions, so ``rayfine --help`` is instant.
Exit codes: 0 success, 1 the work failed (one readable line says why), 2 a bad config or usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

EXIT_FAILED, EXIT_USAGE = 1, 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file or a preset name (see `rayfine validate --list`)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set train.lr=3e-4 (repeatable; values are YAML)",
    )


def _load(args: argparse.Namespace):
    from rayfine.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "runs_dir", None):
        overrides.append(f"storage.runs_dir={args.runs_dir}")
    return load_config(args.config, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from rayfine.config import preset_names

    if args.list:
        print("\n".join(preset_names()))
        return 0
    if not args.config:
        print("error: give a config file or preset name (or --list)", file=sys.stderr)
        return EXIT_USAGE
    print(_load(args).to_yaml(), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from rayfine.runtime import ray_session
    from rayfine.train import fit

    with ray_session(args.address) as local:
        summary = fit(cfg, strict_resources=local)
    print(f"[done] test accuracy {summary['eval']['accuracy']:.4f} in {summary['wall_s']:.0f}s; run directory {summary['run_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayfine",
        description="Fine-tune image and text classifiers on Ray: Ray Data ingest, Ray Train DDP.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="print the resolved config, or every error in it")
    p.add_argument("config", nargs="?", help="a YAML file or a preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    p.add_argument("--list", action="store_true", help="list the shipped presets")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="fine-tune with Ray Train DDP and evaluate on the test split")
    _config_args(p)
    p.add_argument("--runs-dir", help="where run directories go (default: storage.runs_dir, ./runs)")
    p.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from rayfine.config import ConfigError
    from rayfine.errors import RayfineError

    try:
        return func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        what = str(e) if isinstance(e, RayfineError) else f"{type(e).__name__}: {e} (rerun with --debug for the traceback)"
        print(f"error: {what}", file=sys.stderr)
        return EXIT_FAILED


def job_main(command: str, argv: Optional[list[str]] = None) -> int:
    """For ray_jobs/ entrypoints: ``--config X [--set k=v]... [--runs-dir D]`` -> ``rayfine COMMAND``."""
    p = argparse.ArgumentParser(prog=f"ray_jobs/{command}.py", description=f"rayfine {command} as a Ray job")
    p.add_argument("--config", required=True, help="a YAML file (in the working dir) or a preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-dir", help="where run directories go (shared storage on multi-node clusters)")
    args = p.parse_args(argv)
    forwarded = [command, args.config, *[x for kv in args.overrides for x in ("--set", kv)]]
    if args.runs_dir:
        forwarded += ["--runs-dir", args.runs_dir]
    return main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
