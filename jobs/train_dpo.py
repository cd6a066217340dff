"""`ray job submit` entrypoint: DPO training of ICA or PBA on Ray Train.

    ray job submit --working-dir . -- python jobs/train_dpo.py --config configs/train.yaml --method ica
    ray job submit --working-dir . -- python jobs/train_dpo.py --config configs/train.yaml --method pba

Re-submitting the same command resumes from the latest Ray Train checkpoint in the
configured storage path.
"""

import sys

from alignx_ray.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
