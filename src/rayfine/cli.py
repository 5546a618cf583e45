"""The ``rayfine`` command line.

    rayfine validate resnet18_digits --set train.lr=3e-4
    rayfine train resnet18_digits --runs-dir runs

Heavy imports (torch, ray) happen inside the command functions, so ``rayfine --help`` is instant.
Exit codes: 0 success, 1 the work failed (one readable line says why), 2 a bad config or usage, 130
Ctrl-C, 128 + the signal for SIGTERM or SIGHUP, 141 a reader of stdout that went away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from rayfine.config import ServeConfig

EXIT_FAILED, EXIT_USAGE = 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a command killed by SIGPIPE
SET_HELP = "values are YAML, but a text field takes the text as given"


def _config_args(p: argparse.ArgumentParser, stdin: bool = True) -> None:
    p.add_argument("config", help=f"a YAML file{', - for standard input,' if stdin else ''} or a preset name "
                                  "(see `rayfine validate --list`)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a field, e.g. --set train.lr=3e-4 (repeatable; {SET_HELP})",
    )


def _load(args: argparse.Namespace):
    """The command's config (tune and run check its search in their preflight)."""
    from rayfine.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "runs_dir", None):  # a path, not YAML: quoted, so "runs #2" or "a: b" stay as given
        overrides.append(f"storage.runs_dir={json.dumps(args.runs_dir, ensure_ascii=False)}")
    return load_config(args.config, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from rayfine.config import preset_names

    if args.list:
        print("\n".join(preset_names()))
        return 0
    if not args.config:
        print("error: give a config file or preset name (or --list)", file=sys.stderr)
        return EXIT_USAGE
    from rayfine.config import check_search, shadowed_overrides

    cfg = _load(args)
    if not args.schema_only:  # what train, tune and run refuse before Ray starts about the data and model
        from rayfine.config import ConfigError
        from rayfine.data.sources import check_source
        from rayfine.models import check_model

        errors = []
        for check in (lambda: check_source(cfg.data), lambda: check_model(cfg)):
            try:
                check()
            except ConfigError as e:
                errors += e.errors
        if errors:
            raise ConfigError(errors)
    print(cfg.to_yaml(), end="")
    for problem in check_search(cfg) + shadowed_overrides(cfg, args.overrides):  # valid for `rayfine train`
        print(f"note: `rayfine tune` would refuse this search: {problem}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from rayfine.rundir import RunDirLock
    from rayfine.runtime import ray_session
    from rayfine.train import fit
    from rayfine.train.driver import preflight

    preflight(cfg)  # a wrong config is refused before Ray starts
    with RunDirLock(cfg.run_dir(), "train"), ray_session(args.address) as local:
        summary = fit(cfg, strict_resources=local)
    print(f"[done] test accuracy {summary['eval']['accuracy']:.4f} in {summary['wall_s']:.0f}s; run directory {summary['run_dir']}")
    return 0


def _load_search(args: argparse.Namespace):
    """The config of `rayfine tune` or `run`, refused where a --set would change no trial."""
    from rayfine.config import ConfigError, shadowed_overrides

    cfg = _load(args)
    problems = shadowed_overrides(cfg, args.overrides)
    if problems:
        raise ConfigError(problems)
    return cfg


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = _load_search(args)
    from rayfine.rundir import RunDirLock
    from rayfine.runtime import ray_session
    from rayfine.tune import run_search
    from rayfine.tune.search import preflight

    preflight(cfg, resume=args.resume)  # a wrong config is refused before Ray starts
    with RunDirLock(cfg.run_dir(), "tune"), ray_session(args.address) as local:
        summary = run_search(cfg, resume=args.resume, strict_resources=local)
    best = summary["best"]
    print(f"[done] best trial {best['trial_id']}: test accuracy {best['test_accuracy']:.4f}; "
          f"{summary['epochs_run']}/{summary['epochs_full_budget']} epochs in {summary['wall_s']:.0f}s; "
          f"winner in {cfg.run_dir() / 'tune' / 'best'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rayfine.config import ConfigError, apply_overrides, name_problem

    problem = None if args.name is None else name_problem(args.name)  # the model's name in every /v2/models/<name> URL
    if problem:
        raise ConfigError([f"--name: {problem} (got {args.name!r})"])
    raw = apply_overrides({}, list(args.overrides))
    if set(raw) - {"serve"}:
        raise ConfigError([f"--set {k}...: `rayfine serve` takes serve.* settings only" for k in sorted(set(raw) - {"serve"})])
    overrides = dict(raw.get("serve") or {})
    overrides.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    if args.print_config:
        import yaml

        from rayfine.serve.deploy import serve_config_file

        print(yaml.safe_dump(json.loads(json.dumps(serve_config_file(args.path, args.name, overrides))), sort_keys=False), end="")
        return 0
    from rayfine.runtime import ray_session
    from rayfine.serve.app import resolve_checkpoint, serve_settings
    from rayfine.serve.deploy import deploy

    # Refused before Ray starts: a path that holds no checkpoint, a wrong serve.* setting or --port.
    _, settings = serve_settings(resolve_checkpoint(args.path), overrides or None)
    with ray_session(args.address) as local:
        result = deploy(args.path, name=args.name, serve_overrides=overrides or None, if_better=args.if_better,
                        strict_resources=local)
        name, url = result["name"], result["url"]
        if result["action"] == "kept":
            print(f"[serve] kept version {result['version']} of {name}: the new checkpoint is not better ({result['reason']})")
            return 0
        if result["action"] == "unchanged":
            print(f"[serve] {name} already serves version {result['version']}")
            return 0
        reason = f" ({result['reason']})" if result["reason"] else ""
        print(f"[serve] {name} {result['action']}: version {result['version']}{reason}; {url}/v2/models/{name}")
        if notice := key_notice(url, result.get("api_key"), settings):
            print(notice)
        return _keep_serving(name, local, args.detach, result["action"])


def _keep_serving(name: str, local: bool, detach: bool, action: str) -> int:
    """Block until Ctrl-C/SIGTERM, then stop the app (all of Serve on an embedded Ray); with
    ``detach`` on a cluster, return at once and leave it serving. An app this command did not
    deploy (it was kept, or a checkpoint was swapped into it) is not this command's to stop: return
    at once and leave it serving."""
    if action != "deployed":
        return 0
    import signal
    import time

    import ray
    from ray import serve

    if detach and not local:
        return 0
    if detach:
        print("[serve] --detach needs a cluster (--address); an embedded Ray lives only as long as this command")
    print(f"[serve] serving until Ctrl-C; to swap in another checkpoint (from another shell): "
          f"RAY_AUTH_MODE=token rayfine serve OTHER --name {name} --address {ray.get_runtime_context().gcs_address}",
          flush=True)

    def _stop(*_):
        raise KeyboardInterrupt

    # Both signals end the serving loop, whatever handler an earlier stage left installed (Ray
    # Tune leaves its own after a search; rayfine.tune.search._fit puts the previous one back).
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print(f"[serve] stopping {name}", flush=True)
        if local:
            serve.shutdown()
        else:
            from rayfine.serve.deploy import delete_app

            delete_app(name)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rayfine.report import write_reports

    for path in write_reports(args.run_dir):
        print(f"[report] {path}")
    return 0


def curl_example(url: str, kind: str, serve: ServeConfig, pairs: bool = False) -> str:
    """A ready-to-paste request for the served model, with the API key header when the replicas
    have a key (serve.api_key_file, else the variable serve.api_key_env): the shell reads the key
    where the app does, so the key itself is never printed."""
    import re
    import shlex

    if serve.api_key_file:
        key = f"$(cat -- {shlex.quote(os.path.expanduser(serve.api_key_file))})"  # a quoted ~ is not expanded
    elif os.environ.get(serve.api_key_env, "").strip():
        name = serve.api_key_env
        key = f"${{{name}}}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"$(printenv {shlex.quote(name)})"
    else:
        key = ""
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    if kind == "text":
        example = '[["who wrote it?", "the film was written by its director"]]' if pairs else \
            '["a gripping, beautifully acted film"]'
        return f"curl -s{auth} -H 'Content-Type: application/json' {url}/predict -d '{{\"inputs\": {example}}}'"
    return f"curl -s{auth} -F files=@image.png '{url}/predict?top_k=3'"


def key_notice(url: str, api_key: bool | None, serve: ServeConfig) -> str | None:
    """What `serve` and `run` say of the API key once the replicas answer (each reports whether it
    holds one, never the key): that the API asks for it; or, for an API without one that listens
    beyond loopback (serve.host), a warning that anyone who reaches the port can use it."""
    from urllib.parse import urlsplit

    from rayfine.runtime import is_loopback

    if api_key:
        return "[serve] the API asks for its key (Authorization: Bearer KEY, or X-API-Key: KEY)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if api_key is None or is_loopback(host):
        return None
    return (f"[warning] the API has no key and listens on {host}: anyone who reaches port {parts.port} "
            f"can use it; set the variable {serve.api_key_env} (or serve.api_key_file) where the replicas run, "
            "and serve again")


def _check_key_file(cfg) -> None:
    """serve.api_key_file, read as the replicas of an embedded Ray will read it (on a cluster they
    read it on their own nodes): one that cannot be read failed the deploy after the whole search."""
    from rayfine.config import ConfigError
    from rayfine.errors import CheckpointError
    from rayfine.serve.app import read_api_key

    try:
        read_api_key(cfg.serve)
    except CheckpointError as e:
        raise ConfigError([f"{e}; `rayfine run` serves its winner with it after the search"]) from None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_search(args)
    import time

    from rayfine.pipeline import run_pipeline
    from rayfine.rundir import RunDirLock
    from rayfine.runtime import ray_session
    from rayfine.tune.search import preflight

    preflight(cfg, resume=args.resume)  # a wrong config is refused before Ray starts
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        _check_key_file(cfg)
    started = time.perf_counter()
    with RunDirLock(cfg.run_dir(), "run") as lock, ray_session(args.address) as local:
        ray_start = {"ray start": time.perf_counter() - started}
        try:
            result = run_pipeline(cfg, resume=args.resume, strict_resources=local)
        finally:
            lock.release()  # serving reads the winner's checkpoint only: another run may continue this one
        served = result["serve"]
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in {**ray_start, **result["timings_s"]}.items())
        print(f"[run] winner test accuracy {result['eval']['accuracy']:.4f}; {timings}")
        if served["action"] in ("kept", "unchanged"):
            print(f"[run] {served['name']} keeps serving version {served['version']}: {served['reason']}")
        else:
            print(f"[run] {served['name']} {served['action']}: version {served['version']} at {served['url']}")
            if notice := key_notice(served["url"], served.get("api_key"), cfg.serve):
                print(notice)
        print(f"[run] try it:\n  {curl_example(served['url'], cfg.data.kind, cfg.serve, pairs=bool(cfg.data.text_pair_column))}", flush=True)
        return _keep_serving(served["name"], local, args.detach, served["action"])


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rayfine.serve.client import format_predictions, predict

    api_key = Path(args.api_key_file).expanduser().read_text().strip() if args.api_key_file else None
    result = predict(args.url, args.inputs, api_key=api_key, top_k=args.top_k, timeout_s=args.timeout, pairs=args.pairs,
                     texts=args.texts)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_predictions(args.inputs, result, args.pairs, args.texts))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rayfine.config import ConfigError

    path = Path(args.config).expanduser()
    if args.config == "-" or (path.exists() and not path.is_file() and not path.is_dir()):  # stdin, <(...)
        problem = (f"{args.config}: a job reads its config from a file in the working directory (or a preset), "
                   "not from standard input or a pipe: save it to a file in the project")
        raise ConfigError([problem])
    # Validated here, before anything reaches the cluster.
    cfg = _load_search(args) if args.job in ("tune", "pipeline") else _load(args)
    from rayfine.jobs import cli_submit

    return cli_submit(cfg, args.config, job=args.job, overrides=args.overrides, runs_dir=args.runs_dir,
                      working_dir=args.working_dir, job_id=args.submission_id, address=args.address,
                      follow_logs=args.follow, resume=args.resume)


def cmd_jobs(args: argparse.Namespace) -> int:
    from rayfine.jobs import cli_jobs

    return cli_jobs(args.action, getattr(args, "id", None), address=args.address,
                    follow_logs=getattr(args, "follow", False))


def _debug_parent() -> argparse.ArgumentParser:
    """--debug after the command too (`rayfine predict ... --debug`). SUPPRESS: a command's parser
    copies its defaults over the top-level parser's, and would undo `rayfine --debug predict ...`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of unexpected errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from rayfine import __version__

    parser = argparse.ArgumentParser(
        prog="rayfine",
        description="Fine-tune image and text classifiers on Ray: Ray Data ingest, Ray Train DDP.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    debug = _debug_parent()

    p = sub.add_parser("validate", parents=[debug], help="print the resolved config, or every error in it")
    p.add_argument("config", nargs="?", help="a YAML file, - for standard input, or a preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a field ({SET_HELP})")
    p.add_argument("--list", action="store_true", help="list the shipped presets")
    p.add_argument("--schema-only", action="store_true",
                   help="check the fields only, not that data.source and the model are there and fit (for a config "
                        "whose data or model only a cluster has)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", parents=[debug], help="fine-tune with Ray Train DDP and evaluate on the test split")
    _config_args(p)
    p.add_argument("--runs-dir", help="where run directories go (default: storage.runs_dir, ./runs)")
    p.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", parents=[debug], help="hyperparameter search, ASHA by default (tune.scheduler): "
                       "every trial a Ray Train DDP run (config `tune:`)")
    _config_args(p)
    p.add_argument("--runs-dir", help="where run directories go (default: storage.runs_dir, ./runs)")
    p.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--resume", action="store_true",
                   help="continue the search of this config whose driver stopped: finished trials are kept, "
                   "unfinished ones continue from their last checkpoint")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", parents=[debug], help="the main job: ASHA search -> evaluate the winner -> serve it "
                       "(or promote it over the served model when better); serves until Ctrl-C")
    _config_args(p)
    p.add_argument("--runs-dir", help="where run directories go (default: storage.runs_dir, ./runs)")
    p.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--resume", action="store_true", help="continue a search whose driver was killed")
    p.add_argument("--detach", action="store_true", help="on a cluster: return once deployed, leaving it serving")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", parents=[debug], help="write report.html (learning curves, search overview, "
                       "test evaluation) for a run directory")
    p.add_argument("run_dir", help="<runs-dir>/<name> (or its train/ or tune/ folder)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", parents=[debug], help="serve a checkpoint on Ray Serve (HTTP: Open Inference "
                       "Protocol v2 and /predict), or hot-swap it into the running app")
    p.add_argument("path", help="a checkpoint directory, or a run directory of train or tune (tune/best wins)")
    p.add_argument("--name", help="the model name in the URLs and the Serve app (default: the experiment's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                   help="override a serve setting of the checkpoint's config, e.g. --set serve.max_batch_size=32")
    p.add_argument("--host", help="bind address of the HTTP proxy (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default serve.port, 8000)")
    p.add_argument("--if-better", action="store_true",
                   help="swap only when the new checkpoint's validation metric (train.metric) beats the served one's")
    p.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--detach", action="store_true", help="on a cluster: deploy and return (default: serve until Ctrl-C)")
    p.add_argument("--print-config", action="store_true",
                   help="print the `serve deploy` config and exit (for a RayService serveConfigV2, drop its "
                        "http_options: a proxy bound to the pod's 127.0.0.1 is out of its Service's reach)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", parents=[debug],
                       help="ask a served model: files (images, or text files) or texts; prints labels and scores")
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000 (plus the app's route prefix, if any)")
    p.add_argument("inputs", nargs="+", help="image files, or texts (all files or all texts)")
    p.add_argument("--texts", action="store_true", help="send every input as a text, even one that names a file")
    p.add_argument("--pairs", action="store_true",
                   help="texts two at a time, a text and its pair (a model trained with data.text_pair_column)")
    p.add_argument("--top-k", type=int, default=3, help="labels shown per input (default 3)")
    p.add_argument("--api-key-file", help="a file holding the API key (default: the RAYFINE_API_KEY variable)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for an answer")
    p.add_argument("--json", action="store_true", help="print the JSON response")
    p.set_defaults(func=cmd_predict)

    from rayfine.jobs import DEFAULT_ADDRESS, JOB_KINDS  # no heavy imports there

    address_help = (f"the cluster's dashboard (Jobs API), e.g. {DEFAULT_ADDRESS} (default: RAY_API_SERVER_ADDRESS, "
                    f"an http RAY_ADDRESS, else {DEFAULT_ADDRESS}); the auth token comes from RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    p = sub.add_parser("submit", parents=[debug],
                       help="run train, tune or the pipeline on a Ray cluster as a Ray job (Jobs API)")
    _config_args(p, stdin=False)  # the job reads the file on the cluster
    p.add_argument("--job", choices=JOB_KINDS, default="pipeline",
                   help="what the job runs: ray_jobs/<job>.py (default pipeline: search, evaluate, deploy)")
    p.add_argument("--runs-dir", help="where run directories go on the cluster: an absolute path every node mounts "
                   "(default: the cluster's RAYFINE_RUNS_DIR, else storage.runs_dir)")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument("--working-dir", default=".", help="the project directory uploaded as the job's working_dir "
                   "(must hold ray_jobs/; default: .)")
    p.add_argument("--submission-id", help="use this id instead of rayfine-<job>-<name>-<config hash> (e.g. to run "
                   "an identical job again)")
    p.add_argument("--resume", action="store_true",
                   help="tune and pipeline jobs: continue the search of an earlier job of this config whose driver "
                   "stopped (the job runs with --resume, under the id rayfine-<job>-<name>-<config hash>-resume); "
                   "a train job continues its run by itself")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", parents=[debug], help="the Ray jobs of a cluster: list, status, logs, stop")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "every job of the cluster"), ("status", "a job's status and times"),
                         ("logs", "a job's output"), ("stop", "stop a running job")):
        a = actions.add_parser(action, parents=[debug], help=text)
        if action != "list":
            a.add_argument("id", help="the submission id (rayfine-... as `rayfine submit` printed it)")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeded")
        a.add_argument("--address", help=address_help)
        a.set_defaults(func=cmd_jobs)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    # Each line as it is printed, also into a pipe, a file or a CI log (block-buffered otherwise:
    # `tail -f` showed nothing until the command ended, and a killed one lost what it printed).
    with contextlib.suppress(AttributeError, ValueError):  # a stream without reconfigure (a test's)
        sys.stdout.reconfigure(line_buffering=True)
    try:
        code = func(args)
        sys.stdout.flush()  # here, so that a reader that went away (`| head -1`) is caught below
        return code
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the CLI's last resort
        # Whatever the error, when the reader of stdout went away it is what failed: a
        # BrokenPipeError, or one Tune wrapped in a TuneError; a training run's epoch lines stop it
        # as Ctrl-C does (rayfine.train.driver._follow).
        if not _stdout_gone():
            return _handle(e, args.debug)
        # Python's "Note on SIGPIPE": what is left for stdout goes nowhere, and the exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _handle(e: BaseException, debug: bool) -> int:
    from rayfine.config import ConfigError

    if isinstance(e, ConfigError):
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        from rayfine.runtime import terminated, termination_signal

        if terminated():  # SIGTERM (or SIGHUP): the code a shell gives a process that signal ends
            print("terminated", file=sys.stderr)
            return 128 + termination_signal()
        print("interrupted", file=sys.stderr)
        return 130
    return _failed(e, debug)  # the CLI's last resort: one line (or the traceback with --debug)


def _failed(e: Exception, debug: bool) -> int:
    from rayfine.errors import RayfineError

    if debug:
        raise e
    what = str(e) if isinstance(e, RayfineError) else f"{type(e).__name__}: {e} (rerun with --debug for the traceback)"
    print(f"error: {what}", file=sys.stderr)
    return EXIT_FAILED


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on its end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False


def job_main(command: str, argv: Optional[list[str]] = None, extra: tuple[str, ...] = ()) -> int:
    """For ray_jobs/ entrypoints: ``--config X [--set k=v]... [--runs-dir D] [--resume]`` -> ``rayfine
    COMMAND`` (plus ``extra`` flags, e.g. --detach for a job that must end while its app keeps serving).
    --resume continues the search of tune and run; a training run continues by itself."""
    p = argparse.ArgumentParser(description=f"rayfine {command} as a Ray job")
    p.add_argument("--config", required=True, help="a YAML file (in the working dir) or a preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    # A cluster names its shared storage once, for every job: RAYFINE_RUNS_DIR in the nodes' environment
    # (cluster/local/up.sh, the KubeRay manifests and the launcher YAML set it).
    p.add_argument("--runs-dir", default=os.environ.get("RAYFINE_RUNS_DIR") or None,
                   help="where run directories go (shared storage on multi-node clusters; default: "
                   "$RAYFINE_RUNS_DIR, else storage.runs_dir)")
    p.add_argument("--resume", action="store_true", help="continue the search of an earlier job whose driver stopped")
    p.add_argument("--debug", action="store_true", help="a failure prints its traceback (in the job's logs)")
    args = p.parse_args(argv)
    if args.resume and command not in ("tune", "run"):
        print(f"error: --resume: `rayfine {command}` continues the run of its name by itself (from its last "
              "checkpoint); run the job again without --resume", file=sys.stderr)
        return EXIT_USAGE
    forwarded = [command, args.config, *[x for kv in args.overrides for x in ("--set", kv)], *extra]
    if args.runs_dir:
        forwarded += ["--runs-dir", args.runs_dir]
    if args.resume:
        forwarded.append("--resume")
    if args.debug:
        forwarded.append("--debug")
    return main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
