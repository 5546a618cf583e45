"""The main job: search -> evaluate the winner -> serve it (or promote it over what is served).

    from rayfine.pipeline import run_pipeline
    with ray_session():
        result = run_pipeline(load_config("resnet18_digits"))
        print(result["serve"]["url"])

Each stage is the same code its own command runs (`rayfine tune`, `rayfine serve --if-better`),
so the pipeline adds ordering and timing, nothing else. The winner's test evaluation is written
by the search (tune/best/eval.json); the pipeline reports it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from rayfine.config import Config


def run_pipeline(cfg: Config, *, resume: bool = False, strict_resources: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ASHA search of ``cfg``, then deploy (or promote) its winner on Ray Serve.

    Needs a connected Ray. Returns {"search": summary.json, "eval": the winner's test
    evaluation, "serve": the deploy result (action, name, url, version), "timings_s": {...}}.
    """
    from rayfine.serve.deploy import check_replicas_fit, check_swap, deploy
    from rayfine.serve.model import model_api
    from rayfine.tune import run_search

    # The winner is swapped into a live app of this name with the model only: one running with other
    # serve settings than this config's, or serving another kind of input, is refused now, not after
    # the search (another label set only at the deploy: the labels come from the data). A new app's
    # replicas must fit on the cluster (once the search has ended): on an embedded Ray, refused now too.
    if not check_swap(cfg.name, cfg.serve, model_api(cfg)):
        check_replicas_fit(cfg.serve, strict=strict_resources, log=log)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    summary = run_search(cfg, resume=resume, strict_resources=strict_resources, log=log)
    # run_search ends with the winner's test evaluation; report it as a stage of its own.
    eval_s = summary.get("eval_s", 0.0)
    timings["search"] = time.perf_counter() - started - eval_s
    timings["evaluation"] = eval_s

    best_dir = cfg.run_dir() / "tune" / "best"
    evaluation = json.loads((best_dir / "eval.json").read_text())
    log(f"[run] winner {summary['best']['trial_id']}: test accuracy {evaluation['accuracy']:.4f}, "
        f"macro F1 {evaluation['macro_f1']:.4f}")

    started = time.perf_counter()
    served = deploy(best_dir, name=cfg.name, if_better=True, same_settings=True, strict_resources=strict_resources,
                    log=log)
    timings["deploy"] = time.perf_counter() - started
    return {"search": summary, "eval": evaluation, "serve": served, "timings_s": timings}
