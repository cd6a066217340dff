"""`ray job submit` entrypoint: build the AlignX dataset from a run's annotations.

    ray job submit --working-dir . -- python jobs/build_dataset.py --config configs/annotate-qwen14b.yaml

Runs (or reuses) annotation first when the run directory lacks it. Re-submitting the same
command resumes: finished stages are reused, the persona and demographic stages row by row.
"""

import sys

from alignx_ray.cli import main

if __name__ == "__main__":
    main(["build", *sys.argv[1:]])
