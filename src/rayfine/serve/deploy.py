"""Deploying a checkpoint, and hot-swapping the model of a running app: what `rayfine serve` does.

    from rayfine.serve.deploy import deploy
    with ray_session():
        result = deploy("runs/digits")                         # a new app: name = experiment name
        result = deploy("runs/digits2", name="digits", if_better=True)   # swap in place, if better

Deployments are declarative, as `serve deploy config.yaml` and KubeRay do it: the app is
``import_path: rayfine.serve.app:build_app`` with ``args``, and the model to serve is the
deployment's ``user_config``. A swap re-applies the running app's own config with only the
user_config changed, so Serve reconfigures the running replicas in place instead of replacing
them (a code change, or a change of args, would replace them).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

from rayfine.config import ServeConfig
from rayfine.errors import CheckpointError, RayfineError
from rayfine.metrics import is_finite_number
from rayfine.serve.app import DEPLOYMENT_NAME, IMPORT_PATH, resolve_checkpoint, serve_settings, user_config


class DeployError(RayfineError, RuntimeError):
    """The app could not be deployed or updated."""


class SwapFailed(DeployError):
    """The replicas could not load the new checkpoint and kept serving the model they had."""


class Superseded(DeployError):
    """Another deploy applied another version to the app before every replica served this one."""


# An app in these states has replicas serving (UNHEALTHY: one failed its health check, say): a
# deploy of that name swaps its model in place, never replaces the app.
LIVE = ("RUNNING", "DEPLOYING", "UNHEALTHY")


def app_config(checkpoint_dir: Path, name: str, serve_overrides: Optional[dict[str, Any]], route_prefix: str) -> dict:
    """One application of a Serve config file (ServeApplicationSchema) serving this checkpoint."""
    args: dict[str, Any] = {"checkpoint": str(checkpoint_dir), "name": name}
    if serve_overrides:
        args["serve"] = dict(serve_overrides)
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": DEPLOYMENT_NAME, "user_config": user_config(checkpoint_dir)}],
    }


def serve_config_file(checkpoint: str | Path, name: Optional[str] = None,
                      serve_overrides: Optional[dict[str, Any]] = None) -> dict:
    """A complete `serve deploy` config for a checkpoint (without its http_options, a RayService's
    serveConfigV2: a proxy bound to the pod's 127.0.0.1 is out of the Service's reach)."""
    checkpoint_dir = resolve_checkpoint(checkpoint)
    cfg, settings = serve_settings(checkpoint_dir, serve_overrides)
    return {
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [app_config(checkpoint_dir, name or cfg.name, serve_overrides, settings.route_prefix)],
    }


def _details() -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def served_info(name: str, timeout_s: float = 30) -> Optional[dict]:
    """What the running app ``name`` serves (from one replica), or None when no such app runs."""
    from ray import serve

    app = _details().get("applications", {}).get(name)
    if not app or app.get("status") not in LIVE:
        return None
    return serve.get_app_handle(name).info.remote().result(timeout_s=timeout_s)


def settings_changes(running: dict[str, Any], wanted: ServeConfig) -> list[str]:
    """What ``wanted`` changes in the serve settings a replica runs with (its ``info()["settings"]``),
    as "serve.<field> <running> -> <wanted>". A field the replica does not report is newer than its
    rayfine, which ran with that field's default."""
    defaults = ServeConfig().model_dump(mode="json")
    was = {field: running.get(field, defaults[field]) for field in defaults}
    return [f"serve.{field} {was[field]!r} -> {value!r}"
            for field, value in wanted.model_dump(mode="json").items() if was[field] != value]


def is_better(new: dict, served: dict) -> tuple[bool, str]:
    """Compare the new checkpoint's validation metric with the served one's (the new config's metric)."""
    metric, mode = new["metric"], new["metric_mode"]
    served_metrics = served.get("metrics") or {}
    new_value, old_value = new["metrics"].get(metric), served_metrics.get(metric)
    if not is_finite_number(new_value):
        raise CheckpointError(f"{new['checkpoint']}: metrics.json has no finite {metric} "
                              f"({'missing' if metric not in new['metrics'] else new_value}); cannot compare")
    if metric not in served_metrics:
        raise CheckpointError(f"the served checkpoint {served.get('checkpoint')} has no {metric} in metrics.json; cannot compare")
    if not is_finite_number(old_value):  # null in metrics.json: not a number (a diverged epoch), beaten by any
        return True, f"{metric} {new_value:.4f}; the served checkpoint's is not a number ({old_value})"
    better = new_value > old_value if mode == "max" else new_value < old_value
    sign = (">" if better else "<=") if mode == "max" else ("<" if better else ">=")
    return better, f"{metric} {new_value:.4f} {sign} {old_value:.4f} (served)"


def _named(labels: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(label) for label in labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def api_changes(served: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What swapping a model ``new`` (``rayfine.serve.model.model_api``: kind, pairs, labels) into an
    app whose replicas report ``served`` would change for the app's clients: the inputs it takes,
    and its labels, their order included (the columns of 'probabilities'). What either side does
    not say (labels not known yet; replicas of an earlier rayfine) is not compared."""
    def known(key: str) -> bool:
        return served.get(key) is not None and new.get(key) is not None

    changes = []
    if known("kind") and served["kind"] != new["kind"]:
        changes.append(f"inputs: {served['kind']} -> {new['kind']}")
    elif known("pairs") and served["pairs"] != new["pairs"]:
        changes.append("inputs: " + ("[text, pair] rows -> texts" if served["pairs"] else "texts -> [text, pair] rows"))
    if known("labels") and list(served["labels"]) != list(new["labels"]):
        old, now = list(served["labels"]), list(new["labels"])
        gone, added = [x for x in old if x not in now], [x for x in now if x not in old]
        if not gone and not added:
            changes.append(f"the same {len(old)} labels in another order (the columns of 'probabilities')")
        else:
            parts = [f"{_named(gone)} only served now"] if gone else []
            parts += [f"{_named(added)} only new"] if added else []
            changes.append(f"labels: {len(old)} -> {len(now)} ({'; '.join(parts)})")
    return changes


def _url(details: dict, route_prefix: str) -> str:
    http = details.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    if ":" in host and not host.startswith("["):
        # An IPv6 address is bracketed in a URL, or its colons read as the port's (RFC 3986
        # 3.2.2), and a zone's "%" is written %25 (RFC 6874).
        host = "[" + host.replace("%", "%25") + "]"
    return f"http://{host}:{port}{'' if route_prefix == '/' else route_prefix}"


def _swap_checks(name: str, current: dict, settings: ServeConfig | None, model: dict[str, Any],
                 run: bool = False) -> dict:
    """What the live app ``name`` (its Serve details ``current``) serves, its replicas' ``info()``;
    DeployError when a swap into it is refused: an app deployed imperatively, replicas that do not
    answer, a ``model`` (``model_api``) that would change what the app's clients send or get back
    (``api_changes``), or, with ``settings``, serve settings other than those its replicas run with.
    ``run``: the advice is for `rayfine run` (the app is named by the experiment; settings come with
    --set)."""
    other = "run under another name (--set name=...)" if run else "choose another --name"
    if current.get("source") != "declarative" or not current.get("deployed_app_config"):
        raise DeployError(f"app {name!r} was deployed with serve.run (imperative); a hot swap needs a declarative "
                          f"deploy (rayfine serve, serve deploy, KubeRay); delete it or {other}")
    try:
        served = served_info(name) or {}
    except Exception as e:  # noqa: BLE001  (an UNHEALTHY app whose replicas do not answer, say)
        raise DeployError(f"app {name!r} is {current.get('status')} and its replicas do not answer ({e}); "
                          "stop it (`serve shutdown`, or Ctrl-C the `rayfine serve` that runs it) and deploy "
                          "again") from None
    changes = api_changes(served, model)
    if changes:
        raise DeployError(f"app {name!r} serves another task ({'; '.join(changes)}): a hot swap keeps what the app's "
                          f"clients send and get back; {other}, or stop the app (`serve shutdown`, or Ctrl-C the "
                          "`rayfine serve` that runs it) and deploy again")
    if settings is not None:
        # Settings are fixed when the app is built; a swap only replaces the model. Asking for
        # the settings it already runs with is fine (running the same command again). The
        # replicas say what they run: the app's args still name the checkpoint it was first
        # deployed from, which may have been removed or retrained since.
        running = served.get("settings")
        if running is None:  # replicas of an earlier rayfine do not say: what the app was built from
            args = current["deployed_app_config"].get("args") or {}
            built = serve_settings(resolve_checkpoint(args["checkpoint"]), args.get("serve"))[1]
            running = built.model_dump(mode="json")
        changes = settings_changes(running, settings)
        if changes:
            keep = " (or run with its settings: --set serve.<field>=<the value it runs with>)" if run else ""
            raise DeployError(f"app {name!r} is running with other serve settings ({'; '.join(changes)}): a hot "
                              f"swap changes the model only; to change serve settings, stop the app and deploy again"
                              f"{keep}")
    return served


def check_swap(name: str, settings: ServeConfig, model: dict[str, Any]) -> bool:
    """Refuse now what a later ``deploy(..., same_settings=True)`` into app ``name`` would refuse
    (``_swap_checks``; ``model``: ``model_api`` of the config, its labels not known before the
    data is read): `rayfine run` asks before its search, not after it. Nothing to check when no
    Serve runs on the cluster, or no live app of that name. Returns whether there is one (the
    deploy will be a swap, which starts no replicas)."""
    import ray
    from ray.serve.context import _get_global_client

    # Connecting to Serve makes this driver print every job's worker logs (Serve's own choice, made
    # again by the deploy); not during the search that follows.
    worker = ray._private.worker.global_worker
    filtered = worker._filter_logs_by_job
    try:
        client = _get_global_client(raise_if_no_controller_running=False)
        current = client.get_serve_details().get("applications", {}).get(name) if client is not None else None
        live = current is not None and current.get("status") in LIVE
        if live:
            _swap_checks(name, current, settings, model, run=True)
        return live
    finally:
        worker._filter_logs_by_job = filtered


def _node_resources() -> list[dict]:
    """Each live node's total resources."""
    import ray

    return [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]


def initial_replicas(settings: ServeConfig) -> tuple[int, str]:
    """How many replicas a new app starts with (``deployment_options``), and the field that says so."""
    if settings.autoscaling:
        return max(1, settings.min_replicas), "serve.min_replicas"
    return settings.num_replicas, "serve.num_replicas"


def replica_fit_problems(settings: ServeConfig, nodes: list[dict]) -> list[str]:
    """What keeps the replicas a new app starts with off a cluster whose nodes have ``nodes``
    (each node's total resources, as ``ray.nodes()`` gives them): a replica that fits on no node,
    or fewer fitting in all than the app starts with. Serve would wait for them without end (its
    deploy, ours, times out with Serve's message after minutes)."""
    eps = 1e-9
    cpus, gpus = settings.cpus_per_replica, settings.gpus_per_replica

    def fits(node: dict, count_gpus: bool = True) -> int:
        n = int((float(node.get("CPU", 0)) + eps) // cpus)
        if not (gpus and count_gpus):
            return n
        # Ray places a fraction of a GPU on one GPU: replicas share a GPU only where their fractions
        # sum to at most 1 on it (two GPUs hold four replicas of 0.4, not five).
        return min(n, int(float(node.get("GPU", 0)) + eps) * int((1 + eps) // gpus))

    most_cpus = max((float(n.get("CPU", 0)) for n in nodes), default=0.0)
    most_gpus = max((float(n.get("GPU", 0)) for n in nodes), default=0.0)
    total = sum(fits(n) for n in nodes)
    wanted, field = initial_replicas(settings)
    if total == 0:
        need = f"{cpus:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
        fix = []
        if cpus > most_cpus + eps:
            fix.append(f"serve.cpus_per_replica at most {most_cpus:g}")
        if gpus > most_gpus + eps:
            fix.append(f"serve.gpus_per_replica at most {most_gpus:g}" if most_gpus else
                       "serve.gpus_per_replica=0 (no node has a GPU)")
        return [(f"a serve replica needs {need} (serve.cpus_per_replica, serve.gpus_per_replica), but no node of "
                 f"the cluster has that many (the largest: {most_cpus:g} CPUs, {most_gpus:g} GPUs); set "
                 f"{' and '.join(fix) or 'smaller replicas'}")]
    if total < wanted:
        cpus_bind = sum(fits(n, count_gpus=False) for n in nodes) < wanted
        lower = "serve.cpus_per_replica" if cpus_bind or not gpus else "serve.gpus_per_replica"
        return [f"the app starts with {wanted} replicas ({field}={wanted}) of {cpus:g} CPU(s)"
                + (f" and {gpus:g} GPU(s)" if gpus else "") + f" each, but the cluster fits {total}; set {field} "
                f"to at most {total}, or lower {lower}"]
    return []


def check_replicas_fit(settings: ServeConfig, *, strict: bool, log: Callable[[str], None] = print) -> None:
    """``replica_fit_problems`` on the connected cluster. strict (an embedded local Ray, which never
    grows): a ConfigError naming the fields. Not strict (a cluster that may autoscale): a warning."""
    from rayfine.config import ConfigError

    problems = replica_fit_problems(settings, _node_resources())
    if problems and strict:
        raise ConfigError(problems)
    for problem in problems:
        log(f"[warning] {problem} (Serve waits for the cluster to scale up)")


def deploy(
    checkpoint: str | Path,
    *,
    name: Optional[str] = None,
    serve_overrides: Optional[dict[str, Any]] = None,
    if_better: bool = False,
    same_settings: bool = False,
    strict_resources: bool = False,
    timeout_s: float = 300,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Serve ``checkpoint`` as app ``name``, or swap it into the running app of that name.

    A swap changes the model only: with ``serve_overrides``, or ``same_settings`` (the checkpoint's
    own serve settings are what the caller asked for: `rayfine run`), it is refused when the
    running replicas have other serve settings. A new app whose replicas the cluster cannot hold
    is refused with ``strict_resources`` (an embedded local Ray), else deployed with a warning
    (``check_replicas_fit``). Needs a connected Ray. Returns {"action":
    "deployed" | "swapped" | "kept" | "unchanged", "name", "url", "version", "checkpoint", "reason"},
    and when deployed or swapped "api_key": whether the replicas hold an API key.
    """
    from ray import serve

    from rayfine.checkpoints import load_checkpoint
    from rayfine.serve.model import model_api, weights_version

    checkpoint_dir = resolve_checkpoint(checkpoint)
    cfg, settings = serve_settings(checkpoint_dir, serve_overrides)
    name = name or cfg.name
    # Load it here first: a checkpoint that cannot load fails now, not in the replicas.
    ckpt = load_checkpoint(checkpoint_dir)
    version = weights_version(checkpoint_dir)
    new = {"checkpoint": str(checkpoint_dir), "metric": cfg.train.metric, "metric_mode": cfg.train.metric_mode,
           "metrics": ckpt.metrics}
    api = model_api(cfg, list(ckpt.labels))
    del ckpt

    serve.start(http_options={"host": settings.host, "port": settings.port})
    # Read, change and apply Serve's declarative config as one step per cluster (``_deploy_lock``).
    with _deploy_lock(log):
        details = _details()
        apps = details.get("applications", {})
        current = apps.get(name)
        result = {"name": name, "checkpoint": str(checkpoint_dir), "version": version, "reason": ""}
        if current is not None and current.get("status") in LIVE:
            served = _swap_checks(name, current, settings if serve_overrides or same_settings else None, api,
                                  run=same_settings)
            was = served.get("version")  # what the replicas serve before this swap
            route_prefix = current["deployed_app_config"].get("route_prefix") or "/"
            result["url"] = _url(details, route_prefix)
            if served.get("version") == version:
                return {**result, "action": "unchanged", "reason": f"already serving version {version}"}
            if if_better and served.get("version"):
                better, reason = is_better(new, served)
                if not better:
                    return {**result, "action": "kept", "version": served["version"], "reason": reason}
                result["reason"] = reason
            ours = copy.deepcopy(current["deployed_app_config"])
            deployments = [d for d in ours.get("deployments", []) if d.get("name") != DEPLOYMENT_NAME]
            previous = _classifier_of(ours) or {"name": DEPLOYMENT_NAME}
            ours["deployments"] = deployments + [{**previous, "user_config": user_config(checkpoint_dir)}]
            action = "swapped"
            log(f"[serve] swapping {name}: version {served.get('version')} -> {version}")
        else:
            # Serve's declarative deploy does not refuse a route another app holds (a `serve.run` app's
            # "/", say): the two would take turns answering it.
            taken = [n for n, a in apps.items() if n != name and a.get("status") != "DELETING"
                     and a.get("route_prefix") == settings.route_prefix]
            if taken:
                raise DeployError(f"route prefix {settings.route_prefix!r} is taken by app {taken[0]!r}: serve {name!r} "
                                  f"under another (--set serve.route_prefix=/{name}) or delete that app")
            check_replicas_fit(settings, strict=strict_resources, log=log)
            ours = app_config(checkpoint_dir, name, serve_overrides, settings.route_prefix)
            result["url"] = _url(details, settings.route_prefix)
            action, was = "deployed", None
            log(f"[serve] deploying {name} (version {version}) from {checkpoint_dir}")

        _apply_with_others(name, ours, details)
    try:
        info = _wait_for_version(name, version, timeout_s, was)
    except SwapFailed as e:
        if action != "swapped":
            raise
        # Put the config back to what the replicas serve (not the config before: that may name a
        # rollout that failed too), or a replica Serve starts later (a restart, autoscaling) would
        # try the checkpoint they could not load. Unless another deploy has applied its own version
        # since: putting this one's "before" back would undo that one.
        back = {"checkpoint": served.get("checkpoint"), "version": served.get("version")}
        ours["deployments"] = deployments + [{**previous, "user_config": back}]
        with _deploy_lock(log):
            now = _details()  # the apps as they are now
            applied = _deployed_version(now.get("applications", {}).get(name) or {})
            if applied not in (None, version, was):
                raise DeployError(f"{e}; another deploy has since applied version {applied} to {name!r}") from None
            _apply_with_others(name, ours, now)
        raise DeployError(f"{e}; {name!r} keeps serving version {served.get('version')}") from None
    return {**result, "action": action, "api_key": info.get("api_key")}


# Rayfine's deploys to one cluster take turns (a key in the GCS's key-value store): a declarative
# deploy replaces the whole set of apps, so two at once (two `rayfine serve`s, a pipeline job's
# deploy beside one) each read the apps before the other's was applied, and the later one dropped
# the other's app. A holder that did not let go within DEPLOY_LOCK_STALE_S (its process was killed)
# is presumed gone. Serve's own `serve deploy` does not take this turn.
DEPLOY_LOCK_KEY, DEPLOY_LOCK_NAMESPACE = "rayfine_deploy_lock", "rayfine"
DEPLOY_LOCK_STALE_S = 120.0
# How long a deploy that took the turn over from a gone holder waits before it trusts it holds it.
DEPLOY_LOCK_SETTLE_S = 1.0


@contextlib.contextmanager
def _deploy_lock(log: Callable[[str], None] = print, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold this cluster's rayfine deploy turn (see DEPLOY_LOCK_KEY)."""
    from ray.experimental import internal_kv

    key, namespace = DEPLOY_LOCK_KEY, DEPLOY_LOCK_NAMESPACE
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}:{time.time()}"
    deadline, said, took_over = time.time() + timeout_s, False, False
    while True:
        if not internal_kv._internal_kv_put(key, token, overwrite=False, namespace=namespace):  # False: ours now
            if not took_over:
                break
            # Another deploy that found the same holder gone may delete the turn just taken and take
            # its own (the key-value store has no compare-and-delete): after a takeover, the turn is
            # ours only if it still is a moment later.
            time.sleep(DEPLOY_LOCK_SETTLE_S)
            if internal_kv._internal_kv_get(key, namespace=namespace) == token.encode():
                break
            took_over = False
            continue
        held = internal_kv._internal_kv_get(key, namespace=namespace)
        try:
            since = float(held.decode().rsplit(":", 1)[1]) if held else time.time()
        except (ValueError, IndexError):  # not ours to read: treat as just taken
            since = time.time()
        if time.time() - since > DEPLOY_LOCK_STALE_S:
            internal_kv._internal_kv_del(key, namespace=namespace)
            took_over = True
            continue
        if time.time() > deadline:
            raise DeployError(f"another rayfine deploy on this cluster has held its turn for {time.time() - since:.0f}s; "
                              f"try again when it has finished")
        if not said:
            log("[serve] waiting for another rayfine deploy on this cluster to apply its apps")
            said = True
        time.sleep(0.2)
    try:
        yield
    finally:
        if internal_kv._internal_kv_get(key, namespace=namespace) == token.encode():
            internal_kv._internal_kv_del(key, namespace=namespace)


def delete_app(name: str, log: Callable[[str], None] = print) -> None:
    """Delete app ``name`` (a ``rayfine serve`` or ``rayfine run`` on a cluster stopping) in this
    cluster's deploy turn: a deploy that read the apps before the delete and applied them after it
    would bring the app back (``_apply_with_others`` keeps the apps it read)."""
    from ray import serve

    with _deploy_lock(log):
        serve.delete(name)


def _apply_with_others(name: str, ours: dict, details: dict) -> None:
    """Apply ``ours`` as app ``name`` beside the cluster's other declarative apps (``details``)."""
    # A declarative deploy replaces the whole set of declarative apps: keep the others as they are,
    # and the cluster's target_capacity (an operator's, or a KubeRay upgrade's) as it is.
    others = [a["deployed_app_config"] for n, a in (details.get("applications") or {}).items()
              if n != name and a.get("source") == "declarative" and a.get("deployed_app_config")]
    _apply(others + [ours], details.get("target_capacity"))


def _apply(applications: list[dict], target_capacity: Optional[float]) -> None:
    """Serve's declarative deploy of ``applications`` (the whole set of declarative apps)."""
    from pydantic import ValidationError
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config: dict[str, Any] = {"applications": applications}
    if target_capacity is not None:
        config["target_capacity"] = target_capacity
    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as e:  # two apps with one route prefix, say
        problems = "; ".join(x["msg"] for x in e.errors())
        raise DeployError(f"Serve refuses the apps' config: {problems}") from None
    _get_global_client().deploy_apps(schema)


def _classifier_of(app_config: dict) -> dict | None:
    """The Classifier deployment's entry in an app's config (None: the config lists none)."""
    return next((d for d in app_config.get("deployments") or [] if d.get("name") == DEPLOYMENT_NAME), None)


def _deployed_version(app: dict) -> str | None:
    """The model version an app's applied config names (its Classifier's user_config); None where
    it names none (a config written by hand may leave the version out)."""
    return ((_classifier_of(app.get("deployed_app_config") or {}) or {}).get("user_config") or {}).get("version")


def _wait_for_version(name: str, version: str, timeout_s: float, previous: str | None = None) -> dict[str, Any]:
    """Until every running replica of the app answers with ``version`` (a swap from ``previous``, or
    a first deploy); the last replica's ``info()``. SwapFailed when a replica reports that it could
    not load ``version`` (a path only some nodes read fails on those only: each replica is asked,
    through the handle, until all have answered). Superseded when the app's config names a third
    version meanwhile: another deploy swapped its own in (the deploy lock covers a deploy's apply,
    not its wait), and this one's replicas will never all serve ``version``."""
    deadline = time.time() + timeout_s
    last = ""
    answered: dict[str, Any] = {}  # replica id -> the version it last answered with
    while time.time() < deadline:
        app = _details().get("applications", {}).get(name) or {}
        status = app.get("status")
        if status == "DEPLOY_FAILED":
            raise DeployError(f"app {name!r} failed to deploy: {app.get('message', '')}")
        applied = _deployed_version(app)
        if applied not in (None, version, previous):
            raise Superseded(f"another deploy swapped version {applied} into {name!r} before every replica served "
                             f"version {version}; {name!r} serves {applied} once its replicas have loaded it")
        deployment = (app.get("deployments") or {}).get(DEPLOYMENT_NAME) or {}
        if status in ("RUNNING", "UNHEALTHY"):  # UNHEALTHY: a replica failed a health check; the others serve
            try:
                info = served_info(name, timeout_s=10) or {}
            except Exception as e:  # a replica still starting
                info, last = {}, str(e)
            failed = info.get("swap_error") or {}
            if (failed.get("user_config") or {}).get("version") == version:
                raise SwapFailed(f"the replicas could not load {failed['user_config'].get('checkpoint')}: "
                                 f"{failed.get('error')}")
            if info:
                answered[info.get("replica")] = info.get("version")
                running = {r.get("replica_id") for r in deployment.get("replicas") or [] if r.get("state") == "RUNNING"}
                if all(answered.get(r) == version for r in running or {info.get("replica")}):
                    return info
                last = f"{sum(answered.get(r) == version for r in running)} of {len(running)} running replicas serve it"
        # Serve says there why replicas do not start (e.g. the GPUs serve.gpus_per_replica asks for).
        waiting = deployment.get("message")
        last = f"status {status}: {waiting}" if waiting and status != "RUNNING" else last or f"status {status}"
        time.sleep(0.5)
    raise DeployError(f"app {name!r} did not serve version {version} within {timeout_s:.0f}s ({last})")
