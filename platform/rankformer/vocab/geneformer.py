"""Import Geneformer's pickled dictionaries without running arbitrary pickle code.

The real files are plain dicts whose values are str, int, float or numpy scalars (int16 token ids,
float64 medians). Rebuilding a numpy scalar needs exactly two globals, ``numpy.dtype`` and numpy's
``scalar`` constructor; the unpickler below allows those and refuses everything else.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from rankformer import schema
from rankformer.errors import VocabError
from rankformer.io.fs import read_bytes
from rankformer.vocab.gene_vocab import GeneVocab, normalize_gene_id

_ALLOWED_GLOBALS = {
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_plain_dict(uri: str) -> dict[str, str | int | float]:
    """A pickled dict of str keys and str/number values, numpy scalars converted to Python ones."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(read_bytes(uri))).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise VocabError(
            f"{uri} is not a plain pickled dictionary of strings and numbers ({exc}); only "
            "Geneformer's token, median, name and mapping dictionaries can be imported"
        ) from exc
    if not isinstance(obj, dict):
        raise VocabError(f"{uri} holds a {type(obj).__name__}, not a dict; expected a Geneformer dictionary")
    out: dict[str, str | int | float] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise VocabError(f"{uri}: key {key!r} is a {type(key).__name__}, expected str")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise VocabError(
                f"{uri}: value for {key!r} is a {type(value).__name__}; expected str, int or float"
            )
        out[key] = value
    return out


def import_geneformer(
    token_dictionary: str,
    gene_median_dictionary: str,
    mapping_dictionary: str | None = None,
    gene_name_dictionary: str | None = None,
) -> GeneVocab:
    """A GeneVocab equal to Geneformer's dictionaries: same token ids, medians and id mapping."""
    tokens = load_plain_dict(token_dictionary)
    medians = load_plain_dict(gene_median_dictionary)
    specials = {k: int(v) for k, v in tokens.items() if k.startswith("<") and k.endswith(">")}
    genes = [(k, v) for k, v in tokens.items() if k not in specials]
    if not genes:
        raise VocabError(f"{token_dictionary} holds no gene tokens")
    missing = [g for g, _ in genes if g not in medians]
    if missing:
        raise VocabError(
            f"{len(missing)} token genes (e.g. {missing[:3]}) have no entry in "
            f"{gene_median_dictionary}: pass the median dictionary of the same Geneformer release"
        )
    for name in (schema.PAD, schema.MASK):
        if name not in specials:
            raise VocabError(f"{token_dictionary} lacks the special token {name}")
    aliases: dict[str, str] = {}
    if mapping_dictionary:
        for alias, target in load_plain_dict(mapping_dictionary).items():
            aliases[normalize_gene_id(alias)] = str(target)
    names: dict[str, str] = {}
    if gene_name_dictionary:
        for symbol, gid in load_plain_dict(gene_name_dictionary).items():
            names.setdefault(str(gid), symbol)
    gene_set = {g for g, _ in genes}
    return GeneVocab(
        specials=specials,
        gene_ids=tuple(g for g, _ in genes),
        token_ids=np.asarray([int(t) for _, t in genes], dtype=np.int32),
        medians=np.asarray([float(medians[g]) for g, _ in genes], dtype=np.float64),
        aliases={a: t for a, t in aliases.items() if t in gene_set and a != t},
        gene_names={g: s for g, s in names.items() if g in gene_set},
        provenance={
            "source": "geneformer",
            "token_dictionary": token_dictionary,
            "gene_median_dictionary": gene_median_dictionary,
            "mapping_dictionary": mapping_dictionary,
            "gene_name_dictionary": gene_name_dictionary,
        },
    )
