"""``mlp``: the command line, thin over the library. Each command parses its arguments, calls
one library function and prints the result.

    mlp run configs/underwriting.yaml        # the whole workload, end to end
    mlp apply configs/underwriting.yaml      # register the workload's feature definitions
    mlp features configs/underwriting.yaml   # list registered definitions
    mlp ingest checkouts events.parquet      # real-time events onto the event bus
    mlp stream                               # stream processors, until Ctrl-C

Which workload a file runs, and what a workload provides, is the contract in
:mod:`mlplatform.jobs.workload`; the CLI knows no workload by name. What the console shows is
set in one place, :mod:`mlplatform.jobs.console`: one line per step, progress on a terminal,
Ray's own logs only with ``--verbose``.

A ``PlatformError`` prints as one line on stderr with exit code 1 (``--debug`` shows the
traceback); any other exception is a bug and always shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from types import SimpleNamespace

from mlplatform.errors import PlatformError

Handler = Callable[[argparse.Namespace], int | None]


def _workload(args: argparse.Namespace, overrides: dict | None = None):  # noqa: ANN202 - mlplatform.jobs.Workload
    from mlplatform.jobs import load_workload

    return load_workload(args.workload, overrides)


def _platform(workload):  # noqa: ANN001, ANN202 - a Platform for the workload's platform config
    from mlplatform.jobs.console import quiet_ray
    from mlplatform.platform import Platform

    quiet_ray()
    return Platform(workload.platform_config)


def _run_steps(args: argparse.Namespace, steps, platform) -> dict:  # noqa: ANN001
    from mlplatform.jobs import StepRunner

    return StepRunner(platform.storage, force=getattr(args, "force", False)).run_all(steps)


def cmd_run(args: argparse.Namespace) -> None:
    import time

    workload = _workload(args)
    platform = _platform(workload)
    started = time.monotonic()
    # flushed: the step lines that follow go to stderr, and stdout may be a pipe
    print(f"mlp run: workload {workload.name} on {platform!r}", flush=True)
    try:
        results = workload.run(platform, force=args.force)
        print(f"done in {time.monotonic() - started:.1f}s")
        deployed = results.get("deploy")
        if getattr(deployed, "url", None) is None:
            return
        if not platform.owns_ray:
            print(f"decision endpoint stays live on the cluster at {deployed.url}/v1/decisions")
        elif sys.stdin.isatty() and not args.exit:
            print(f"decision endpoint live at {deployed.url}/v1/decisions (local Ray) - press Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopping")
        else:
            print(f"decision endpoint was live at {deployed.url}; the local Ray stops with this process")
    finally:
        platform.close()


def cmd_generate(args: argparse.Namespace) -> None:
    workload = _workload(args)
    with _platform(workload) as platform:
        workload.run(platform, only={"generate"}, force=args.force)


def cmd_apply(args: argparse.Namespace) -> None:
    from mlplatform.jobs.feature_steps import apply_step

    workload = _workload(args)
    with _platform(workload) as platform:
        step = apply_step(platform.features, workload.definitions(), force=args.force, dry_run=args.dry_run)
        print(step.run().value)


def cmd_features(args: argparse.Namespace) -> None:
    from mlplatform.features.listing import describe_registry

    workload = _workload(args)
    with _platform(workload) as platform:
        print(describe_registry(platform.features))


def cmd_backfill(args: argparse.Namespace) -> None:
    from mlplatform.jobs.feature_steps import backfill_step

    workload = _workload(args)
    data = workload.config.data
    with _platform(workload) as platform:
        views = args.view or [v.name for v in platform.features.list_feature_views()]
        steps = [
            backfill_step(platform.features, platform.datasets, view, args.start or data.start, args.end or data.end)
            for view in views
        ]
        _run_steps(args, steps, platform)


def cmd_materialize(args: argparse.Namespace) -> None:
    from mlplatform.jobs.feature_steps import materialize_step

    workload = _workload(args)
    if args.generation is not None and not args.rollback:
        from mlplatform.errors import ConfigError

        raise ConfigError("--generation names the generation to restore: use it with --rollback VIEW")
    if args.rollback or args.generations:
        with _platform(workload) as platform:
            if args.rollback:
                print(platform.features.rollback(args.rollback, args.generation).summary())
            for generation in platform.features.generations(args.rollback or args.generations):
                print(f"  {generation.summary()}")
        return
    data = workload.config.data
    with _platform(workload) as platform:
        step = materialize_step(platform.features, args.end or data.end, args.view or None, start=args.start)
        _run_steps(args, [step], platform)


def cmd_train(args: argparse.Namespace) -> None:
    workload = _workload(args, {"model.tune": None} if args.tune is False else None)
    with _platform(workload) as platform:
        workload.run(platform, only={"train", "promote"}, force=args.force)


def cmd_tune(args: argparse.Namespace) -> None:
    workload = _workload(args)
    if not getattr(getattr(workload.config, "model", None), "tune", None):
        from mlplatform.errors import ConfigError

        raise ConfigError(f"{args.workload}: no 'model.tune' section (search_space, num_samples) to tune with")
    with _platform(workload) as platform:
        workload.run(platform, only={"train", "promote"}, force=args.force)


def cmd_models_list(args: argparse.Namespace) -> None:
    workload = _workload(args)
    with _platform(workload) as platform:
        names = [args.name] if args.name else platform.models.names()
        for name in names:
            aliases = platform.models.aliases(name)
            for v in platform.models.list(name):
                tags = ",".join(a for a, n in aliases.items() if n == v.version)
                auc = v.metrics.get("test_auc")
                print(
                    f"{name:<16} v{v.version:<4} {v.flavor:<9} {v.created_at:%Y-%m-%d %H:%M:%S}  "
                    f"test_auc={'n/a' if auc is None else f'{auc:.4f}'}  {tags}"
                )


def cmd_models_promote(args: argparse.Namespace) -> int:
    from mlplatform.errors import PromotionRefused

    workload = _workload(args)
    with _platform(workload) as platform:
        try:
            event = platform.models.promote(args.name, args.version, args.alias, force=args.force, reason=args.reason)
        except PromotionRefused as exc:
            print(f"refused: {args.name} v{args.version} stays out of {args.alias}", file=sys.stderr)
            for line in exc.decision.lines() if exc.decision is not None else [str(exc)]:
                print(f"  {line}", file=sys.stderr)
            print("  override with --force --reason TEXT", file=sys.stderr)
            return 1
        print(event.summary())
        for line in (event.decision or {}).get("checks", []):
            print(f"  {line['line']}")
        return 0


def cmd_models_history(args: argparse.Namespace) -> None:
    workload = _workload(args)
    with _platform(workload) as platform:
        for event in platform.models.alias_history(args.name, args.alias):
            print(event.summary())


def cmd_deploy(args: argparse.Namespace) -> None:
    from mlplatform.serving.client import api_key

    workload = _workload(args)
    platform = _platform(workload)
    api_key(platform.storage, platform.config.serving.api_key_env)
    deployed = platform.serving.deploy(args.model, num_replicas=args.replicas, blocking=not args.detach)
    print(f"deployed {deployed.model_name} v{deployed.model_version} at {deployed.url}")


def cmd_decide(args: argparse.Namespace) -> None:
    import json
    import os

    from mlplatform.config import load_config
    from mlplatform.errors import DataError, ServingError
    from mlplatform.serving.client import post_decision

    text = args.application
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    try:
        application = json.loads(text)
    except ValueError as exc:
        raise DataError(f"--application is not JSON: {exc}") from None
    config = load_config(args.config)
    key = os.environ.get(config.serving.api_key_env)
    if not key:
        raise ServingError(f"set ${config.serving.api_key_env} to the decision service's API key")
    url = args.url or f"http://{config.serving.host}:{config.serving.port}"
    try:
        print(json.dumps(post_decision(url, key, application), indent=2))
    except OSError as exc:
        raise ServingError(f"decision service at {url} did not answer: {exc}") from None


def cmd_keys_create(args: argparse.Namespace) -> None:
    from mlplatform.serving.keys import new_key

    key, entry = new_key(args.role)
    print(f"key (give it to the caller; it is not stored anywhere): {key}")
    print(f"entry (append to MLP_API_KEY_DIGESTS or serving.api_key_digests_file): {entry}")


def cmd_score(args: argparse.Namespace) -> None:
    workload = _workload(args)
    with _platform(workload) as platform:
        result = platform.batch.score(args.model, args.input, alias=args.alias, output=args.output)
        print(result)


def cmd_rl_evaluate(args: argparse.Namespace) -> None:
    from mlplatform.rl.api import window_of

    workload = _workload(args)
    with _platform(workload) as platform:
        result = platform.rl.evaluate(args.model, window_of(args.start, args.end), version=args.version, alias=args.alias, level=args.level)
    print(f"{result.policy}: {result.decisions:,} decisions {result.window[0]:%Y-%m-%d %H:%M} to {result.window[1]:%Y-%m-%d %H:%M}, logged policy earned {result.logged_value:.2f}")
    for e in result.estimates.values():
        print(f"  {e.estimator:<5} {e.value:10.2f}  {args.level:.0%} interval [{e.low:.2f}, {e.high:.2f}]  effective sample size {e.effective_sample_size:,.0f}")


def cmd_monitor(args: argparse.Namespace) -> None:
    workload = _workload(args)
    platform = _platform(workload)
    report = platform.monitoring.report(args.model, window=args.window, version=args.version, bound=args.bound)
    for d in [*report.features, report.score]:
        if d.status in ("shift", "watch"):
            print(f"  {d.status:<5} {d.name}: PSI {d.psi:.3f}")
    flagged = ", ".join(report.flagged) or "nothing"
    print(f"monitor {report.model} v{report.version}: {report.decisions:,} decisions, flagged {flagged}; "
          f"report {platform.storage.uri(report.key)}/report.md")


def cmd_submit(args: argparse.Namespace) -> None:
    from mlplatform.errors import JobError
    from mlplatform.jobs.submit import Jobs

    command = list(args.entrypoint)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise JobError("nothing to run: mlp submit --address URL -- mlp run configs/underwriting.yaml")
    import shlex

    jobs = Jobs()
    result = jobs.submit(shlex.join(command), address=args.address, working_dir=args.working_dir, wait=False)
    if not args.no_wait:
        for line in jobs.tail(result.job_id, address=args.address):
            print(line, flush=True)
        result = jobs.wait(result.job_id, address=args.address)
    print(f"job {result.job_id}: {result.status}")


def cmd_ingest(args: argparse.Namespace) -> None:
    from mlplatform.features.ingest import read_rows
    from mlplatform.platform import Platform

    rows = read_rows(args.file)
    print(Platform.from_config(args.config).features.ingest(args.source, rows))


def cmd_consistency(args: argparse.Namespace) -> None:
    from datetime import UTC, datetime

    from mlplatform.timestamps import parse_instant

    workload = _workload(args)
    platform = _platform(workload)
    since = parse_instant(args.since, "--since") if args.since else None
    report = platform.features.consistency(args.service, since=since, sample=args.sample)
    where = f"reports/consistency/{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    written = report.write(platform.storage, where)
    for r in report.per_feature.itertuples():
        print(f"  {r.ref:<48} {r.exact_match_rate:8.2%} exact  ({r.compared:,} compared, {r.missing_online} missing online, {r.extra_online} extra online)")
    verdict = f"flagged: {', '.join(report.flagged)}" if report.flagged else "every feature matches exactly"
    print(f"consistency of {report.decisions:,} decisions on {args.service}: {verdict} -> {written['summary']}")


def cmd_stream(args: argparse.Namespace) -> None:
    from mlplatform.jobs.console import quiet_ray
    from mlplatform.platform import Platform

    quiet_ray()
    with Platform.from_config(args.config) as platform:
        processors = platform.features.start_processors(args.source or None).ready()
        print(f"mlp stream: {processors} - Ctrl-C to stop", flush=True)
        try:
            processors.wait()
        except KeyboardInterrupt:
            pass
        final = processors.stop().values()
        total = {k: sum(s[k] for s in final) for k in ("read", "applied", "late", "logged", "acked", "errors")}
        print(
            f"stopped: {total['read']} events read, {total['applied']} new online, {total['late']} late, "
            f"{total['logged']} logged offline, {total['acked']} acknowledged, {total['errors']} errors retried"
        )


def cmd_status(args: argparse.Namespace) -> None:
    from mlplatform.jobs.submit import Jobs

    for row in Jobs().status(args.job_id, address=args.address):
        print(f"{row['job_id']:<28} {row['status']:<10} {row['entrypoint']}" + (f"  ({row['message']})" if row["message"] else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlp",
        description="mlplatform: feature store, training, model registry and serving on one Ray cluster.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for platform errors")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's details and Ray's own logs (INFO)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="one of the commands below")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "Run the whole workload end to end (the main job).")
    p.add_argument("workload", help="workload YAML, e.g. configs/underwriting.yaml")
    p.add_argument("--exit", action="store_true", help="exit after the sample decisions (no Ctrl-C wait on a terminal)")
    p.add_argument("--force", action="store_true", help="run every step, even those that are up to date")

    p = add("generate", cmd_generate, "Generate the workload's synthetic data under the storage root.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--force", action="store_true", help="generate even when the same data is there")

    p = add("apply", cmd_apply, "Register the workload's feature definitions and print what changed.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--force", action="store_true", help="allow changes that invalidate a view's offline data")
    p.add_argument("--dry-run", action="store_true", help="show the diff without recording it")

    p = add("features", cmd_features, "List registered entities, feature views and feature services.")
    p.add_argument("workload", help="workload YAML")

    p = add("backfill", cmd_backfill, "Compute feature views from their sources into the offline store (Ray Data).")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--view", action="append", help="a view to backfill (repeatable); default all")
    p.add_argument("--start", help="range start (exclusive), e.g. 2024-01-01; default the data's start")
    p.add_argument("--end", help="range end (inclusive); default the data's end")
    p.add_argument("--force", action="store_true", help="backfill even views that are up to date")

    p = add("materialize", cmd_materialize, "Load the latest feature values into the online store.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--view", action="append", help="a view to materialize (repeatable); default all")
    p.add_argument("--start", help="full rebuild from this time; default: incremental since the last run")
    p.add_argument("--end", help="up to this time; default the data's end")
    p.add_argument("--rollback", metavar="VIEW", help="make VIEW's previous online generation current again (no materialization)")
    p.add_argument("--generation", help="with --rollback: the kept generation to restore instead of the previous one")
    p.add_argument("--generations", metavar="VIEW", help="list VIEW's kept online generations (no materialization)")

    p = add("train", cmd_train, "Train (Ray Train), evaluate, write the model card, register and promote.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--no-tune", dest="tune", action="store_false", default=None, help="ignore model.tune")
    p.add_argument("--force", action="store_true", help="train even when this training set and spec are registered")

    p = add("tune", cmd_tune, "Tune with Ray Tune + ASHA (model.tune in the workload), register the best trial.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--force", action="store_true", help="tune even when this training set and spec are registered")

    models = sub.add_parser("models", help="List and promote registered models.", description="List and promote registered models.")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True, help="list, promote or history")
    p = models_sub.add_parser("list", help="List versions with metrics and aliases.", description="List versions with metrics and aliases.")
    p.set_defaults(handler=cmd_models_list)
    p.add_argument("workload", help="workload YAML")
    p.add_argument("name", nargs="?", help="model name; default all")
    p = models_sub.add_parser("promote", help="Point an alias (default production, through the promotion gate) at a version.", description="Point an alias (default production, through the promotion gate) at a version.")
    p.set_defaults(handler=cmd_models_promote)
    p.add_argument("workload", help="workload YAML")
    p.add_argument("name", help="model name")
    p.add_argument("version", type=int, help="version number")
    p.add_argument("--alias", default="production", help="alias to move (default production, which is gated)")
    p.add_argument("--force", action="store_true", help="move production even though the promotion gate refuses")
    p.add_argument("--reason", help="why (required with --force); recorded in the alias history")
    p = models_sub.add_parser("history", help="Show every alias move and refused promotion.", description="Show every alias move and refused promotion.")
    p.set_defaults(handler=cmd_models_history)
    p.add_argument("workload", help="workload YAML")
    p.add_argument("name", help="model name")
    p.add_argument("--alias", help="one alias only")

    p = add("deploy", cmd_deploy, "Deploy the feature server and decision endpoint on Ray Serve.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--model", default="underwriting", help="registered model to serve (its production alias)")
    p.add_argument("--replicas", type=int, default=1, help="serving replicas")
    p.add_argument("--detach", action="store_true", help="return once deployed instead of serving until Ctrl-C")

    p = add("decide", cmd_decide, "Send one checkout application to the decision endpoint and print the answer.")
    p.add_argument("--application", required=True, help="JSON of the application, or @file.json")
    p.add_argument("--config", default="configs/local.yaml", help="platform config (host, port, API key env var)")
    p.add_argument("--url", help="endpoint base URL; default from the config")

    keys = sub.add_parser("keys", help="Create API keys for the serving application.", description="Create API keys for the serving application.")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True, help="create")
    p = keys_sub.add_parser(
        "create",
        help="Print a new random API key and its 'role+role:sha256hex' entry.",
        description="Print a new random API key and its 'role+role:sha256hex' entry (only the entry goes where deploy runs).",
    )
    p.set_defaults(handler=cmd_keys_create)
    p.add_argument(
        "--role",
        action="append",
        required=True,
        choices=["decide", "read_features", "write_features", "operate", "read_ui"],
        help="a role the key holds (repeatable)",
    )

    p = add("score", cmd_score, "Batch-score applications with a registered model (Ray Data actor pool).")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("input", help="Parquet path/URI of applications")
    p.add_argument("--model", default="underwriting", help="registered model name")
    p.add_argument("--alias", default="production", help="model alias")
    p.add_argument("--output", help="output Parquet path; default a versioned dataset under the root")

    rl = sub.add_parser("rl", help="Offer policies: off-policy evaluation on logged decisions.", description="Offer policies: off-policy evaluation on logged decisions.")
    rl_sub = rl.add_subparsers(dest="rl_command", metavar="ACTION", required=True, help="evaluate")
    p = rl_sub.add_parser("evaluate", help="IPS, SNIPS and doubly robust value of a registered policy on a window of rewarded decisions.", description="IPS, SNIPS and doubly robust value of a registered policy on a window of rewarded decisions.")
    p.set_defaults(handler=cmd_rl_evaluate)
    p.add_argument("workload", help="workload YAML (for its platform config)")
    p.add_argument("--model", required=True, help="a registered policy model, e.g. credit_line_bandit")
    p.add_argument("--alias", help="the version behind this alias (default: the latest)")
    p.add_argument("--version", type=int, help="this version (default: the latest)")
    p.add_argument("--start", help="window start (inclusive), e.g. 2024-05-01; with --end")
    p.add_argument("--end", help="window end (exclusive); with --start")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")

    p = add("monitor", cmd_monitor, "PSI per feature and score: recent decisions against the model's training snapshot; writes a report.")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--model", required=True, help="registered model name, e.g. underwriting")
    p.add_argument("--window", default="1d", help="decisions made this far back (default 1d; e.g. 6h, 7d)")
    p.add_argument("--version", type=int, help="model version (default the production alias)")
    p.add_argument("--bound", type=float, default=0.25, help="PSI at or above this flags a column (default 0.25)")

    p = add("submit", cmd_submit, "Submit a command to a Ray cluster as a Ray job and stream its logs.")
    p.add_argument("--address", help="dashboard / job API URL, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="directory shipped with the job (default .)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command, e.g. mlp run configs/underwriting.yaml")

    p = add("ingest", cmd_ingest, "Check events of a stream source from a file and append them to the event bus.")
    p.add_argument("source", help="a registered stream source, e.g. checkouts")
    p.add_argument("file", help="events as Parquet (.parquet) or JSON lines (.jsonl, .ndjson, .json), one event per row")
    p.add_argument("--config", default="configs/local.yaml", help="platform config (storage root, event bus)")

    p = add("consistency", cmd_consistency, "Compare logged decisions' features with their offline values (training/serving skew).")
    p.add_argument("workload", help="workload YAML")
    p.add_argument("--service", required=True, help="the feature service the decisions were scored with, e.g. underwriting_v1")
    p.add_argument("--since", help="only decisions made at or after this time (default: all logged)")
    p.add_argument("--sample", type=int, default=1000, help="compare at most this many decisions (default 1000)")

    p = add("stream", cmd_stream, "Run the stream processors (event bus -> online state, offline log) until Ctrl-C.")
    p.add_argument("--source", action="append", help="a stream source to process (repeatable); default all registered")
    p.add_argument("--config", default="configs/local.yaml", help="platform config (storage root, event bus, online store)")

    from mlplatform.pipelines.cli import register as register_pipeline

    register_pipeline(sub, open_platform=lambda config: _platform(SimpleNamespace(platform_config=config)))

    from mlplatform.ui.server import register as register_ui

    register_ui(sub, open_workload=lambda path: _workload(SimpleNamespace(workload=path)), open_platform=_platform)

    p = add("status", cmd_status, "Show Ray jobs on a cluster (one job with JOB_ID).")
    p.add_argument("job_id", nargs="?", help="a submission id; default all jobs")
    p.add_argument("--address", help="dashboard / job API URL (or RAY_ADDRESS)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mlplatform.jobs.console import configure

    undo_console = configure(verbose=args.verbose)
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
    finally:
        undo_console()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
