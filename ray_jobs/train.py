"""Ray Jobs entrypoint: train one config on the cluster this job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/train.py --config resnet18_digits --set train.epochs=5

Run again with the same config, it continues the training run of its name from its last checkpoint
(no --resume: that is for searches).

Parse -> load config -> one call -> exit code (0 ok, 1 failed, 2 bad config).
"""

import sys

from rayfine.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
