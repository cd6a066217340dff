"""`ray job submit` entrypoint: ingest forum threads and annotate every response.

    ray job submit --working-dir . -- python jobs/annotate.py --config configs/annotate-qwen14b.yaml

Re-submitting the same command with the same run directory resumes a killed run.
"""

import sys

from alignx_ray.cli import main

if __name__ == "__main__":
    main(["annotate", *sys.argv[1:]])
