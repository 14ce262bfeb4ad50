"""`ray job submit` entrypoint: cell or gene embeddings of a corpus on a pool of Ray actors.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/embed.py --model models:/gf-v2@current --corpus s3://b/corpus --out s3://b/emb \
        --level cell --num-workers 8 --use-gpu

Flags (or --config FILE.yaml with EmbedConfig fields) are those of `rankformer embed`. Inside a job
RAY_ADDRESS is set, so the actors run on the submitting cluster.
"""

import sys

from rankformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
