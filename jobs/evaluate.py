"""`ray job submit` entrypoint: alignment accuracy of a trained model on a benchmark file.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml \
        --benchmark s3://bucket/benchmarks/p_soups.json --method pba \
        --policy /models/alignxpert-pba --reference /models/Llama-3.1-8B-Instruct --out /runs/eval/pba-psoups

Scoring runs on a Ray Data actor pool checkpointed by row id: re-submitting the same
command resumes it.
"""

import sys

from alignx_ray.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
