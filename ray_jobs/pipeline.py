"""Ray Jobs entrypoint: the main job on the cluster this job runs in: ASHA search -> the winner
evaluated on the test split -> deployed on Ray Serve (or promoted over the served model when it
is better). The job ends once the app serves; the app keeps serving on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/pipeline.py --config resnet18_digits
    rayfine submit resnet18_digits --job pipeline        # the same, with a deterministic submission id

A pipeline whose job stopped mid-search continues with ``--resume`` (``rayfine submit ... --resume``;
in a KubeRay RayJob, add it to the entrypoint and apply the RayJob again).

Parse -> load config -> one call -> exit code (0 ok, 1 failed, 2 bad config).
"""

import sys

from rayfine.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run", extra=("--detach",)))
