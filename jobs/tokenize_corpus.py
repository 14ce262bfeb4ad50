"""`ray job submit` entrypoint: tokenize a corpus into Parquet.

    ray job submit --address http://HEAD:8265 -- \
        python jobs/tokenize_corpus.py --config tokenize.yaml [flags that override it]

The YAML holds TokenizeConfig fields (inputs, vocab, out, layout, max_length, carry,
coverage_floor, read: {...}, cluster: {...}); flags are those of `rankformer tokenize`. Inside a
job RAY_ADDRESS is set, so the work runs on the submitting cluster.
"""

import sys

from rankformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
