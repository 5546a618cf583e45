"""Ray Jobs entrypoint: deploy (or hot-swap) the model of one config's run on the cluster's Ray
Serve, then exit and leave it serving.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/serve.py --config resnet18_digits --set serve.num_replicas=2

The run directory of the config (<runs-dir>/<name>: tune's winner, else train's checkpoint) is
served under the experiment's name; ``--set serve.*`` overrides its serve settings, the other
``--set`` keys only locate the run. Parse -> load config -> one call -> exit code (0 ok, 1 failed,
2 bad config).
"""

import argparse
import json
import os
import sys

from rayfine.cli import EXIT_USAGE, main

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="ray_jobs/serve.py", description="rayfine serve as a Ray job")
    p.add_argument("--config", required=True, help="a YAML file (in the working dir) or a preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-dir", default=os.environ.get("RAYFINE_RUNS_DIR") or None,
                   help="where the run directories are (default: $RAYFINE_RUNS_DIR, else storage.runs_dir)")
    p.add_argument("--debug", action="store_true", help="a failure prints its traceback (in the job's logs)")
    args = p.parse_args()
    from rayfine.config import ConfigError, load_config

    try:
        # A path, not YAML: quoted, so "runs #2" or "a: b" stay as given (as rayfine.cli._load quotes it).
        runs_dir = [f"storage.runs_dir={json.dumps(args.runs_dir, ensure_ascii=False)}"] if args.runs_dir else []
        cfg = load_config(args.config, args.overrides + runs_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    serve_sets = [x for kv in args.overrides if kv.startswith("serve.") for x in ("--set", kv)]
    sys.exit(main(["serve", str(cfg.run_dir()), "--detach", *serve_sets, *(["--debug"] if args.debug else [])]))
