"""`ray job submit` entrypoint: masked-gene pretraining on Ray Train, tracked in MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pretrain.py --config pretrain.yaml [flags that override it]

The YAML holds PretrainConfig fields (corpus, out, preset, model: {...}, max_steps, seed,
optim: {...}, batch: {...}, scale: {num_workers, use_gpu, storage_path, ...}, track:
{tracking_uri, registered_model, alias}); flags are those of `rankformer pretrain`. Inside a job
RAY_ADDRESS is set, so the workers run on the submitting cluster.
"""

import sys

from rankformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
