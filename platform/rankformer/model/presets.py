"""Model presets: the published Geneformer architectures and a tiny one for tests.

Figures from the published configs (Geneformer V1-10M, V2-104M, V2-316M; Hugging Face BERT,
absolute positions, ReLU, layer-norm eps 1e-12, init range 0.02, type vocabulary 2). Vocabulary
size and pad id always come from the GeneVocab, never from the preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from rankformer.errors import InputError
from rankformer.vocab.gene_vocab import GeneVocab

if TYPE_CHECKING:
    from transformers import BertConfig


@dataclass(frozen=True)
class Preset:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float
    layout: str  # the corpus layout it is made for: v1 (no specials) or v2 (<cls>/<eos>)
    hidden_act: str = "relu"


PRESETS: dict[str, Preset] = {
    "geneformer-v1": Preset(6, 256, 4, 512, 2048, 0.02, 0.02, "v1"),
    "geneformer-v2-104m": Preset(12, 768, 12, 3072, 4096, 0.1, 0.1, "v2"),
    "geneformer-v2-316m": Preset(18, 1152, 18, 4608, 4096, 0.1, 0.1, "v2"),
    # tests and demos: seconds on a CPU; fits either layout's lengths
    "tiny": Preset(2, 32, 2, 64, 4096, 0.0, 0.0, "any"),
}


def preset(name: str, overrides: dict[str, Any] | None = None) -> Preset:
    if name not in PRESETS:
        raise InputError(f"preset {name!r} is not one of {sorted(PRESETS)}")
    known = {f.name for f in fields(Preset)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise InputError(f"model override(s) {unknown} are not preset fields; known: {sorted(known)}")
    return replace(PRESETS[name], **(overrides or {}))


def bert_config(p: Preset, vocab: GeneVocab) -> BertConfig:
    """A Hugging Face BertConfig for this preset and vocabulary (absolute positions; models are
    built with SDPA attention)."""
    from transformers import BertConfig

    arch = {k: v for k, v in asdict(p).items() if k != "layout"}
    cfg = BertConfig(
        vocab_size=vocab.n_tokens,
        pad_token_id=vocab.pad_id,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        initializer_range=0.02,
        **arch,
    )
    return cfg


def check_fits(p: Preset, preset_name: str, corpus_layout: str, corpus_max_length: int) -> None:
    """A preset made for one layout refuses the other; positions must cover the corpus length."""
    if p.layout != "any" and p.layout != corpus_layout:
        raise InputError(
            f"preset {preset_name!r} is for {p.layout} corpora (with{'' if p.layout == 'v2' else 'out'} "
            f"<cls>/<eos>) but the corpus has the {corpus_layout} layout; use a "
            f"{corpus_layout} preset (geneformer-v1 for v1, geneformer-v2-* for v2) or re-tokenize"
        )
    if p.max_position_embeddings < corpus_max_length:
        raise InputError(
            f"the model's max length ({p.max_position_embeddings} positions) is shorter than the "
            f"corpus's max_length {corpus_max_length}; raise max_position_embeddings or tokenize "
            f"with --max-length {p.max_position_embeddings}"
        )
