"""Column and file names shared by every stage. Nothing else spells these strings."""

from typing import Final

VERSION: Final = "0.1.0"  # of the package; written into every manifest

INPUT_IDS: Final = "input_ids"
LENGTH: Final = "length"
CELL_ID: Final = "cell_id"
SOURCE_FILE: Final = "source_file"
SOURCE_ROW: Final = "source_row"

# obs columns the tokenizer reads when present
N_COUNTS: Final = "n_counts"
FILTER_PASS: Final = "filter_pass"
DEFAULT_GENE_ID_COLUMN: Final = "ensembl_id"

PAD: Final = "<pad>"
MASK: Final = "<mask>"
CLS: Final = "<cls>"
EOS: Final = "<eos>"

CORPUS_MANIFEST: Final = "manifest.json"
CORPUS_CLAIM: Final = "_corpus_config.json"
CORPUS_VOCAB: Final = "vocab.json"  # the vocabulary a corpus was tokenized with, in its folder
SHARD_STATS_KEY: Final = b"rankformer.shard"

# Geneformer's normalisation: counts per 10,000.
TARGET_SUM: Final = 10_000
