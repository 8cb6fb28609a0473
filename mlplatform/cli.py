"""``mlp``: the command line, thin over the library. Each command parses its arguments, calls
one library function and prints the result.

    mlp run configs/underwriting.yaml        # the whole workload, end to end
    mlp apply configs/underwriting.yaml      # register the workload's feature definitions
    mlp features configs/underwriting.yaml   # list registered definitions

A ``PlatformError`` prints as one line on stderr with exit code 1 (``--debug`` shows the
traceback); any other exception is a bug and always shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from mlplatform.errors import PlatformError

Handler = Callable[[argparse.Namespace], int | None]


def _workload(args: argparse.Namespace):  # noqa: ANN202 - returns mlplatform.jobs.Workload
    from mlplatform.jobs import load_workload

    return load_workload(args.workload)


def cmd_run(args: argparse.Namespace) -> None:
    _workload(args).run()


def cmd_generate(args: argparse.Namespace) -> None:
    workload = _workload(args)
    with workload.platform() as platform:
        workload.module.generate_data(platform, workload.config, echo=print)


def cmd_apply(args: argparse.Namespace) -> None:
    workload = _workload(args)
    with workload.platform() as platform:
        result = platform.features.apply(workload.module.definitions(), force=args.force, dry_run=args.dry_run)
        print(result)


def cmd_features(args: argparse.Namespace) -> None:
    from mlplatform.features.listing import describe_registry

    workload = _workload(args)
    with workload.platform() as platform:
        print(describe_registry(platform.features))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlp",
        description="mlplatform: feature store, training, model registry and serving on one Ray cluster.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for platform errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "Run the whole workload end to end (the main job).")
    p.add_argument("workload", help="workload YAML, e.g. configs/underwriting.yaml")

    p = add("generate", cmd_generate, "Generate the workload's synthetic data under the storage root.")
    p.add_argument("workload", help="workload YAML")

    p = add("apply", cmd_apply, "Register the workload's feature definitions and print what changed.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--force", action="store_true", help="allow changes that invalidate a view's offline data")
    p.add_argument("--dry-run", action="store_true", help="show the diff without recording it")

    p = add("features", cmd_features, "List registered entities, feature views and feature services.")
    p.add_argument("workload", help="workload YAML")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except PlatformError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
