"""The gene vocabulary: token ids for special tokens and genes, each gene's nonzero median, and the
alias table that maps input gene ids (symbols, old ids) onto vocabulary genes.

One JSON file with a format version and a content hash. Every later artifact records the hash and
loading checks it, so a corpus is never read with a vocabulary other than the one that made it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankformer import schema
from rankformer.errors import VocabError

FORMAT = "rankformer-gene-vocab"
FORMAT_VERSION = 1
V1_SPECIALS: dict[str, int] = {schema.PAD: 0, schema.MASK: 1}
V2_SPECIALS: dict[str, int] = {schema.PAD: 0, schema.MASK: 1, schema.CLS: 2, schema.EOS: 3}
ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
ENSEMBL_PREFIX = r"^ENS[A-Z]*G\d"  # looks like an Ensembl gene id (any species), loosely


def normalize_gene_id(raw: object) -> str:
    """Upper-case, strip, and drop an Ensembl version suffix (ENSG00000141510.17 -> ENSG00000141510)."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return ""
    text = str(raw).strip().upper()
    if text.startswith("ENS") and "." in text and ENSEMBL_RE.match(text):
        text = text.split(".", 1)[0]
    return text


@dataclass(frozen=True)
class GeneVocab:
    """Token ids and medians. ``gene_ids[i]`` has token ``token_ids[i]`` and median ``medians[i]``."""

    specials: dict[str, int]
    gene_ids: tuple[str, ...]
    token_ids: np.ndarray  # int32, one per gene
    medians: np.ndarray  # float64, one per gene, > 0
    aliases: dict[str, str] = field(default_factory=dict)  # upper-case alias -> gene id
    gene_names: dict[str, str] = field(default_factory=dict)  # gene id -> symbol
    provenance: dict[str, Any] = field(default_factory=dict)  # not hashed: how it was made

    def __post_init__(self) -> None:
        _check_content(self)

    # --- lookups -------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(max(self.token_ids.max(initial=-1), max(self.specials.values())) + 1)

    @property
    def pad_id(self) -> int:
        return int(self.specials[schema.PAD])

    @property
    def gene_lo(self) -> int:
        """The lowest gene token id: specials come first, so a token is a gene's when >= this."""
        return int(self.token_ids.min())

    def token_layout(self) -> tuple[int, int]:
        """(pad id, lowest gene token id): what batching and pooling need of a vocabulary."""
        return self.pad_id, self.gene_lo

    @property
    def has_v2_specials(self) -> bool:
        return schema.CLS in self.specials and schema.EOS in self.specials

    def token(self, name: str) -> int:
        if name not in self.specials:
            raise VocabError(
                f"vocabulary has no special token {name!r}; it has {sorted(self.specials)}. "
                "A Geneformer V1 vocabulary (no <cls>/<eos>) only fits the v1 layout."
            )
        return self.specials[name]

    @functools.cached_property
    def token_by_gene_id(self) -> dict[str, int]:
        """Gene id -> token id (built once: request paths map genes on every call)."""
        return dict(zip(self.gene_ids, self.token_ids.tolist(), strict=True))

    @functools.cached_property
    def gene_id_by_token(self) -> np.ndarray:
        """Object array indexed by token id: the gene id (None at special tokens)."""
        out = np.full(self.n_tokens, None, dtype=object)
        out[self.token_ids] = np.asarray(self.gene_ids, dtype=object)
        return out

    def gene_tokens_in(self, tokens: np.ndarray) -> np.ndarray:
        """The entries of ``tokens`` that are gene tokens (specials and ids past the vocabulary
        dropped), in their order."""
        t = np.asarray(tokens, dtype=np.int64)
        t = t[(t >= 0) & (t < self.n_tokens)]
        is_gene = np.zeros(self.n_tokens, dtype=bool)
        is_gene[self.token_ids] = True
        return t[is_gene[t]]

    def median_by_token(self) -> np.ndarray:
        """Dense float64 array indexed by token id (NaN at special tokens)."""
        out = np.full(self.n_tokens, np.nan)
        out[self.token_ids] = self.medians
        return out

    @functools.cached_property
    def symbol_index(self) -> dict[str, str]:
        """Upper-case symbol -> gene id from ``gene_names`` (a symbol two genes share is left out)."""
        seen: dict[str, set[str]] = {}
        for gid, sym in self.gene_names.items():
            seen.setdefault(normalize_gene_id(sym), set()).add(gid)
        return {s: next(iter(g)) for s, g in seen.items() if len(g) == 1}

    @functools.cached_property
    def has_symbol_aliases(self) -> bool:
        """Whether the alias table maps symbols (not only other Ensembl ids)."""
        return any(not re.match(ENSEMBL_PREFIX, a) for a in self.aliases)

    def map_gene_ids(
        self, raw_ids: Sequence[object], extra_aliases: Mapping[str, str] | None = None, names: bool = False
    ) -> np.ndarray:
        """Token id for each input gene id, or -1 where it maps to no vocabulary gene.

        Ids are upper-cased and looked up in ``extra_aliases`` (a user's symbol table), then in
        the vocabulary's alias table; an id that is itself a vocabulary gene maps to itself. With
        ``names``, an id that maps to no gene by then is looked up among the vocabulary's own
        symbols (:attr:`symbol_index`), unless its alias table already holds symbols (a gene
        table's or Geneformer's: it decides, ambiguous symbols left out). Several input ids may map
        to one token: callers sum their counts.
        """
        token_of = self.token_by_gene_id
        extra = extra_aliases or {}
        symbols = self.symbol_index if names and not self.has_symbol_aliases else {}
        out = np.full(len(raw_ids), -1, dtype=np.int32)
        for i, raw in enumerate(raw_ids):
            key = normalize_gene_id(raw)
            if not key:
                continue
            key = extra.get(key, key)
            gene = self.aliases.get(key, key)
            out[i] = token_of.get(gene, token_of.get(symbols.get(key, ""), -1))
        return out

    # --- hashing and persistence --------------------------------------------------------------
    def _hashed_content(self) -> dict[str, Any]:
        return {
            "specials": dict(sorted(self.specials.items(), key=lambda kv: kv[1])),
            "genes": {
                "id": list(self.gene_ids),
                "token": [int(t) for t in self.token_ids],
                "median": [float(m) for m in self.medians],
            },
            "aliases": dict(sorted(self.aliases.items())),
            "gene_names": dict(sorted(self.gene_names.items())),
        }

    @functools.cached_property
    def content_hash(self) -> str:
        """Computed once per vocabulary (a 25k-gene vocabulary takes ~12 ms to serialise; the
        loaders compare hashes several times per job). The vocabulary is frozen: never mutate its
        arrays in place."""
        blob = json.dumps(self._hashed_content(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "content_hash": self.content_hash}
        doc.update(self._hashed_content())
        doc["provenance"] = self.provenance
        return json.dumps(doc, indent=1, allow_nan=False)

    def save(self, uri: str) -> str:
        from rankformer.io.fs import write_bytes_atomic

        write_bytes_atomic(uri, self.to_json().encode())
        return self.content_hash

    @classmethod
    def load(cls, uri: str, expect_hash: str | None = None) -> GeneVocab:
        from rankformer.io.fs import read_bytes

        try:
            doc = json.loads(read_bytes(uri))
        except json.JSONDecodeError as exc:
            raise VocabError(f"vocabulary {uri} is not valid JSON ({exc}); rebuild it") from exc
        vocab = cls.from_doc(doc, where=uri)
        if expect_hash is not None and vocab.content_hash != expect_hash:
            raise VocabError(
                f"vocabulary {uri} has hash {vocab.content_hash} but this artifact was made with "
                f"{expect_hash}; pass the vocabulary it was made with"
            )
        return vocab

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], where: str = "<vocab>") -> GeneVocab:
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise VocabError(
                f"{where} is not a rankformer gene vocabulary (missing format={FORMAT!r}); make one "
                "with `rankformer vocab build` or `rankformer vocab import-geneformer`"
            )
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise VocabError(
                f"{where} has vocabulary format_version {version!r}; this rankformer reads version "
                f"{FORMAT_VERSION}: rebuild it with this version or upgrade rankformer"
            )
        try:
            genes = doc["genes"]
            vocab = cls(
                specials={str(k): int(v) for k, v in doc["specials"].items()},
                gene_ids=tuple(str(g) for g in genes["id"]),
                token_ids=np.asarray(genes["token"], dtype=np.int32),
                medians=np.asarray(genes["median"], dtype=np.float64),
                aliases={str(k): str(v) for k, v in doc.get("aliases", {}).items()},
                gene_names={str(k): str(v) for k, v in doc.get("gene_names", {}).items()},
                provenance=dict(doc.get("provenance", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, VocabError):
                raise
            raise VocabError(f"{where} is missing or has malformed field {exc}; rebuild it") from exc
        stated = doc.get("content_hash")
        if stated != vocab.content_hash:
            raise VocabError(
                f"{where}: content_hash {stated!r} does not match its content "
                f"({vocab.content_hash}): the file was edited or corrupted; rebuild or re-import it"
            )
        return vocab


_BY_HASH: dict[str, GeneVocab] = {}  # the last few vocabularies this process read, by content hash
_BY_HASH_MAX = 8


def load_expected(uri: str, expect_hash: str) -> GeneVocab:
    """The vocabulary that an artifact (a model folder, a corpus) says it was made with: read from
    ``uri`` and checked against ``expect_hash`` once per process, then kept. A job reads its
    model's vocabulary several times (the door check, then each model it loads), and a 25k-gene
    one takes ~30 ms to parse and hash. Kept by content hash, so a vocabulary with that hash is the
    one asked for wherever it was read (a file changed since is not read again in this process)."""
    vocab = _BY_HASH.get(expect_hash)
    if vocab is None:
        vocab = GeneVocab.load(uri, expect_hash=expect_hash)
        while len(_BY_HASH) >= _BY_HASH_MAX:
            _BY_HASH.pop(next(iter(_BY_HASH)))
        _BY_HASH[expect_hash] = vocab
    return vocab


def _check_content(v: GeneVocab) -> None:
    n = len(v.gene_ids)
    if n == 0:
        raise VocabError("vocabulary has no genes")
    if v.token_ids.shape != (n,) or v.medians.shape != (n,):
        raise VocabError(
            f"vocabulary arrays disagree: {n} genes, tokens {v.token_ids.shape}, medians {v.medians.shape}"
        )
    for name in (schema.PAD, schema.MASK):
        if name not in v.specials:
            raise VocabError(f"vocabulary lacks special token {name}")
    all_tokens = np.concatenate([v.token_ids, np.asarray(list(v.specials.values()), np.int32)])
    if len(np.unique(all_tokens)) != len(all_tokens) or all_tokens.min() < 0:
        raise VocabError("vocabulary token ids are not unique non-negative integers")
    if len(set(v.gene_ids)) != n:
        raise VocabError("vocabulary lists a gene id twice")
    bad = ~(np.isfinite(v.medians) & (v.medians > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VocabError(f"gene {v.gene_ids[i]} has median {v.medians[i]!r}; medians must be finite and > 0")


def build_vocab(
    gene_ids: Sequence[str],
    medians: Sequence[float] | np.ndarray,
    layout_specials: Mapping[str, int] = V2_SPECIALS,
    aliases: Mapping[str, str] | None = None,
    gene_names: Mapping[str, str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> GeneVocab:
    """A vocabulary with genes sorted by id and numbered after the special tokens."""
    order = np.argsort(np.asarray(gene_ids, dtype=object), kind="stable")
    ids = tuple(str(gene_ids[i]) for i in order)
    first = max(layout_specials.values()) + 1
    gene_set = set(ids)
    return GeneVocab(
        specials=dict(layout_specials),
        gene_ids=ids,
        token_ids=np.arange(first, first + len(ids), dtype=np.int32),
        medians=np.asarray(medians, dtype=np.float64)[order],
        aliases={k: v for k, v in (aliases or {}).items() if v in gene_set},
        gene_names={k: v for k, v in (gene_names or {}).items() if k in gene_set},
        provenance=dict(provenance or {}),
    )


def aliases_from_table(
    symbols: Iterable[object], ensembl_ids: Iterable[object]
) -> tuple[dict[str, str], dict[str, str]]:
    """(alias table upper-case symbol -> Ensembl id, names Ensembl id -> symbol) from a user table.

    A symbol listed for several ids is ambiguous and left out of the alias table.
    """
    seen: dict[str, set[str]] = {}
    names: dict[str, str] = {}
    for sym, gid in zip(symbols, ensembl_ids, strict=True):
        s, g = normalize_gene_id(sym), normalize_gene_id(gid)
        if not s or not g:
            continue
        seen.setdefault(s, set()).add(g)
        names.setdefault(g, str(sym).strip())
    aliases = {s: next(iter(gs)) for s, gs in seen.items() if len(gs) == 1}
    return aliases, names


def read_gene_table(uri: str) -> tuple[dict[str, str], dict[str, str]]:
    """(aliases, names) from a two-column CSV/TSV of Ensembl id and symbol (either order, no
    header needed; the column of Ensembl-looking values is the id)."""
    import pandas as pd

    from rankformer.io.fs import open_input

    with open_input(uri) as f:
        table = pd.read_csv(f, sep=None, engine="python", header=None, dtype=str)
    if table.shape[1] < 2:
        raise VocabError(
            f"{uri}: a gene table needs two columns (Ensembl id, symbol); found {table.shape[1]}"
        )
    id_col = int(table.iloc[:, 1].str.match(ENSEMBL_PREFIX).mean() > 0.5)
    return aliases_from_table(table.iloc[:, 1 - id_col], table.iloc[:, id_col])


def guess_id_kind(raw_ids: Sequence[object]) -> str:
    """A human description of what kind of gene ids these look like, for error messages."""
    ids = [normalize_gene_id(x) for x in raw_ids]
    ids = [x for x in ids if x]
    if not ids:
        return "empty ids"
    sample = ids[:5000]
    share = lambda pat: sum(1 for x in sample if re.match(pat, x)) / len(sample)  # noqa: E731
    if share(r"^ENSMUSG\d") > 0.5:
        return "mouse Ensembl ids (ENSMUSG…): map them to human orthologs or use a mouse vocabulary"
    if share(r"^ENSG\d") > 0.5:
        return "human Ensembl ids"
    if share(r"^ENS[A-Z]+G\d") > 0.5:
        return "non-human Ensembl ids: map them to human orthologs or use a vocabulary of that species"
    if share(r"^\d+$") > 0.5:
        return "numeric ids (Entrez?): map them to Ensembl ids first"
    if share(r"^[A-Z][A-Z0-9\-\.]*$") > 0.5:
        return (
            "gene symbols (e.g. " + ", ".join(sample[:3]) + "): pass --gene-table with a "
            "symbol->Ensembl table, or point --gene-id-column at an Ensembl id column"
        )
    return "unrecognised ids (e.g. " + ", ".join(sample[:3]) + ")"
