"""`ray job submit` entrypoint: fine-tune a gene classifier (cross-validated by gene)
on Ray Train, tracked in MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/finetune_genes.py --config finetune_genes.yaml [flags that override it]

The YAML holds FinetuneGenesConfig fields; flags are those of `rankformer finetune genes`.
Inside a job RAY_ADDRESS is set, so training runs on Ray Train workers of the submitting cluster.
"""

import sys

from rankformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", "genes", *sys.argv[1:]]))
