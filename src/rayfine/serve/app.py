"""The Ray Serve application: ``build_app(args)`` and the ``Classifier`` deployment.

    serve run rayfine.serve.app:build_app checkpoint=runs/digits/train/checkpoint
    # or in a `serve deploy` config file / a KubeRay RayService's serveConfigV2:
    #   import_path: rayfine.serve.app:build_app
    #   args: {checkpoint: /data/runs/digits/train/checkpoint, name: digits, serve: {max_batch_size: 32}}

``args``: ``checkpoint`` (a checkpoint directory, or a run directory of `rayfine train` / `rayfine
tune`), optional ``name`` (the model name in the URLs; default the experiment's name) and optional
``serve`` (overrides of the checkpoint's ``serve:`` section). Everything else comes from the
checkpoint alone: weights, labels and the preprocessing shared with training.

The deployment's ``user_config`` is ``{"checkpoint": <dir>, "version": <optional>}`` (version: the
weights' hash, so that new weights written over the same directory are a change too): changing only that (a `serve
deploy` of an edited config, or `rayfine serve OTHER`) makes Serve call ``reconfigure`` on the
running replicas, which load the new weights beside the old ones and swap them in between two
batches. Requests in flight finish on the model they started with, queued ones included: each
request is validated against a model and queued with it, a batch holds requests of one model and
runs on it, and a swapped-out model stays loaded until its last queued request is answered. Every
response names the version that answered it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from rayfine.config import ConfigError, ServeConfig, validate
from rayfine.errors import CheckpointError
from rayfine.serve.batching import DynamicBatcher
from rayfine.serve.model import Answer, ServedModel, load_served, run_batch, weights_version

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "Classifier"
IMPORT_PATH = "rayfine.serve.app:build_app"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, or from a run directory of train or tune (tune's
    winner, tune/best/checkpoint, before train/checkpoint)."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, path / "checkpoint", path / "tune" / "best" / "checkpoint", path / "train" / "checkpoint"):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.yaml").is_file():
            return candidate
        aside = candidate.with_name(candidate.name + ".old")  # checkpoints.export_checkpoint's swap
        if candidate != path and not candidate.exists() and (aside / "model.safetensors").is_file():
            # Not the next candidate (a search's winner would be served as the training run's model).
            raise CheckpointError(f"{candidate} is missing and {aside} holds the checkpoint it replaced: an export "
                                  f"is swapping it in, or stopped part-way; try again, or if it stays so, "
                                  f"rename {aside.name} back to {candidate.name}")
    raise CheckpointError(
        f"{path} holds no checkpoint: give a checkpoint directory (model.safetensors, config.yaml, labels.json) "
        "or a run directory with tune/best/checkpoint or train/checkpoint"
    )


def _checkpoint_of(user_config: Optional[dict]) -> str:
    path = (user_config or {}).get("checkpoint")
    if not path:
        raise CheckpointError("user_config needs {checkpoint: <directory>}")
    return str(resolve_checkpoint(path))


def user_config(checkpoint_dir: Path) -> dict[str, str]:
    """What a replica's ``reconfigure`` loads; a new value is a hot swap."""
    return {"checkpoint": str(checkpoint_dir), "version": weights_version(checkpoint_dir)}


def read_api_key(settings: ServeConfig, environ: Optional[dict] = None) -> Optional[bytes]:
    """The API key from serve.api_key_file, else from the variable serve.api_key_env; None: open.
    A configured key file that cannot be read stops the replica (never serve open by mistake)."""
    if settings.api_key_file:
        try:
            key = Path(settings.api_key_file).expanduser().read_text().strip()
        except OSError as e:
            raise CheckpointError(f"serve.api_key_file {settings.api_key_file}: {e.strerror}") from None
        if not key:
            raise CheckpointError(f"serve.api_key_file {settings.api_key_file} is empty")
        return key.encode()
    key = (os.environ if environ is None else environ).get(settings.api_key_env, "").strip()
    return key.encode() if key else None


def deployment_options(settings: ServeConfig) -> dict[str, Any]:
    """Serve deployment options from the serve: section: replicas or autoscaling, resources, queues."""
    options: dict[str, Any] = {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "ray_actor_options": {"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
    }
    if settings.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "initial_replicas": max(1, settings.min_replicas),
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
            "look_back_period_s": settings.look_back_period_s,
        }
    else:
        options["num_replicas"] = settings.num_replicas
    return options


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class Classifier:
    """One replica: the model of the current user_config, dynamic batching, the HTTP API."""

    def __init__(self, name: str, settings_json: str):
        import torch

        self.name = name
        self.settings = ServeConfig.model_validate_json(settings_json)
        self.api_key = read_api_key(self.settings)
        self.model: Optional[ServedModel] = None
        self.swap_error: Optional[dict[str, Any]] = None  # the last swap that could not load (see reconfigure)
        self._swap_lock = asyncio.Lock()
        # Ray gives a replica as many threads as CPUs it reserved; torch should not use more.
        torch.set_num_threads(max(1, int(self.settings.cpus_per_replica)))
        # A request is (model, items): batches never mix models (see infer).
        self.batcher = DynamicBatcher(self._run_batch, self.settings.max_batch_size,
                                      self.settings.batch_wait_timeout_s, size_fn=lambda request: len(request[1]),
                                      group_fn=lambda request: id(request[0]))
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (never in production)
            self.replica_id = "local"

    async def reconfigure(self, user_config: dict) -> None:
        """Load the checkpoint of ``user_config`` and swap it in (a hot swap when already serving).
        ``checkpoint`` may name a run directory, as build_app's args may (a RayService's
        serveConfigV2 names the run directory the pipeline writes again).

        A replica that cannot load its first model fails to start. A swap that cannot load keeps the
        model it serves and reports why in ``info()["swap_error"]``: Serve stops a replica whose
        reconfigure raises and starts one with the new user_config, which fails the same way, so a
        bad checkpoint path in a rollout would take the app down."""
        async with self._swap_lock:
            if self.model is None:
                self.model = await asyncio.to_thread(load_served, _checkpoint_of(user_config), self.settings)
                return
            try:
                path = _checkpoint_of(user_config)
                current = self.model
                if current.path == path and current.version == user_config.get("version"):
                    self.swap_error = None  # back to what it serves (deploy's rollback of a failed swap)
                    return
                # Loading runs beside the event loop: the old model keeps answering meanwhile.
                self.model = await asyncio.to_thread(load_served, path, self.settings)
                self.swap_error = None
            except Exception as e:  # noqa: BLE001  (any failure to load: keep serving, say why)
                self.swap_error = {"user_config": dict(user_config or {}), "error": f"{type(e).__name__}: {e}"}
                logger.error("hot swap to %s failed; still serving version %s: %s",
                             (user_config or {}).get("checkpoint"), self.model.version, self.swap_error["error"])

    def __serve_build_asgi_app__(self):
        from rayfine.serve.api import make_api

        return make_api(self)

    async def infer(self, items: list, model: ServedModel) -> Answer:
        """One request's items, run on ``model``: the model the route checked them against (their
        kind, a pinned version), even if a swap lands while they wait; concurrent requests on one
        model share forward passes (rayfine.serve.batching)."""
        arrived = time.perf_counter_ns()
        try:
            answer = await self.batcher.submit((model, items))
        except Exception:  # its forward pass failed (a cancelled request is not a failed one)
            model.stats.record_request(False, time.perf_counter_ns() - arrived, None, None)
            raise
        queued = None if answer.started_ns is None else max(0, answer.started_ns - arrived)
        model.stats.record_request(answer.error is None, time.perf_counter_ns() - arrived, queued, answer.phases_ns)
        return answer

    async def _run_batch(self, requests: list[tuple[ServedModel, list]]) -> list[Answer]:
        """Items of concurrent requests -> one forward pass (sizes from the serve: section)."""
        model = requests[0][0]  # the batcher groups requests by model: one model per batch
        return await asyncio.to_thread(run_batch, model, [items for _, items in requests])

    async def info(self) -> dict[str, Any]:
        """For handles (`rayfine serve`: --if-better, a swap's check of serve settings; tests): the
        served checkpoint, its stats, the serve settings this replica runs with (the app's args
        name the checkpoint it was first deployed from, which a swap leaves as it was), and whether
        it holds an API key (never the key)."""
        common = {"name": self.name, "settings": self.settings.model_dump(mode="json"),
                  "api_key": self.api_key is not None}
        if self.model is None:
            return {**common, "version": None}
        s = self.model.stats
        return {**common, "replica": self.replica_id, **self.model.describe(),
                "stats": {"inference_count": s.inference_count, "execution_count": s.execution_count,
                          "batch_sizes": dict(s.by_size)}, "swap_error": self.swap_error}


class AppArgs(BaseModel):
    """The args of ``build_app`` (what `serve run ... key=value` and a config's ``args:`` give)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="A checkpoint directory, or a run directory of train or tune.")
    name: Optional[str] = Field(None, description="The model name in the URLs; default: the experiment's name.")
    serve: dict[str, Any] = Field(default_factory=dict, description="Overrides of the checkpoint's serve: section.")


def serve_settings(checkpoint_dir: Path, overrides: Optional[dict[str, Any]] = None):
    """(experiment config, serve settings) of a checkpoint, with ``serve:`` overrides validated as
    part of the whole config, so that errors name serve.<field>."""
    from rayfine.checkpoints import read_config

    cfg = read_config(checkpoint_dir)
    raw = cfg.to_dict()
    raw["serve"] = {**raw["serve"], **(overrides or {})}
    return cfg, validate(raw).serve


def build_app(args: dict[str, Any]):
    """The application builder for `serve run`, `serve deploy` and KubeRay (see the module doc)."""
    try:
        parsed = AppArgs.model_validate(dict(args))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError([f"build_app args: {problems}; allowed: checkpoint, name, serve"]) from None
    checkpoint_dir = resolve_checkpoint(parsed.checkpoint)
    cfg, settings = serve_settings(checkpoint_dir, parsed.serve)
    return Classifier.options(
        user_config=user_config(checkpoint_dir), **deployment_options(settings)
    ).bind(parsed.name or cfg.name, settings.model_dump_json())
