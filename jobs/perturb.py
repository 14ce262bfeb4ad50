"""`ray job submit` entrypoint: in silico perturbation of a corpus on a pool of Ray actors.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/perturb.py --model models:/gf-v2@current --corpus s3://b/corpus --out s3://b/ko \
        --kind delete --mode all --state-column disease --start-state dcm --goal-state nf \
        --num-workers 8 --use-gpu

Flags (or --config FILE.yaml with PerturbConfig fields) are those of `rankformer perturb`; then
`rankformer perturb stats OUT --goal-state nf`. Inside a job RAY_ADDRESS is set.
"""

import sys

from rankformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["perturb", *sys.argv[1:]]))
