"""Ray Jobs entrypoint: the ASHA search of one config on the cluster this job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/tune.py --config resnet18_digits --set tune.num_samples=8
    rayfine submit resnet18_digits --job tune            # the same, with a deterministic submission id

A search whose job stopped (driver killed, `rayfine jobs stop`, a head restart) continues with
``--resume`` (``rayfine submit ... --resume``): finished trials are kept, unfinished ones continue
from their last checkpoints; without it, a run directory that holds a search is refused.

Parse -> load config -> one call -> exit code (0 ok, 1 failed, 2 bad config).
"""

import sys

from rayfine.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("tune"))
