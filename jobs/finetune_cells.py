"""`ray job submit` entrypoint: fine-tune a cell classifier (split by group) on Ray
Train, tracked in MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/finetune_cells.py --config finetune_cells.yaml [flags that override it]

The YAML holds FinetuneCellsConfig fields; flags are those of `rankformer finetune cells`.
Inside a job RAY_ADDRESS is set, so training runs on Ray Train workers of the submitting cluster.
"""

import sys

from rankformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", "cells", *sys.argv[1:]]))
