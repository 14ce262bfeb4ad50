"""`ray job submit` entrypoint: exact per-gene medians over a corpus -> vocab JSON.

    ray job submit --address http://HEAD:8265 -- \
        python jobs/build_vocab.py --config vocab.yaml [flags that override it]

The YAML holds VocabBuildConfig fields (inputs, out, layout, min_cells, read: {...}, cluster: {...}).
"""

import sys

from rankformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["vocab", "build", *sys.argv[1:]]))
