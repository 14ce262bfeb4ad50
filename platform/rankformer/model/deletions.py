"""A cell's single-gene deletions through the first layer, its work shared between them.

Deleting position ``p`` of a cell of ``n + 1`` tokens leaves ``n``: the tokens before ``p`` where they
stood, those after it one position earlier. Over all of a cell's deletions the first layer therefore
sees only ``2n`` distinct input rows: ``o[i]`` (token ``i`` at position ``i``) and ``s[i]`` (token
``i + 1`` at position ``i``); deletion ``p`` reads ``o[i]`` for ``i < p`` and ``s[i]`` for ``i >= p``.
Their query, key and value projections are made once per cell, and the first layer's attention of
every deletion comes from sums over keys split at ``p``:

    num(p, i) = sum_{j < p} e(q_i, k_o[j]) v_o[j] + sum_{j >= p} e(q_i, k_s[j]) v_s[j]

(``e`` the exponentiated score, the same for the normaliser). For a batch of consecutive deletions
``p0 .. p1-1``, the keys outside the band are one matrix product and those inside it a cumulative
sum: about ``n^2 d`` multiply-adds a batch instead of ``n^2 d`` a deletion. The layers above see a
different input in every deletion and run as usual, by the same operations as Hugging Face's
``BertLayer`` called directly (its module and keyword plumbing cost a GPU's host about as much as
launching the work), the query, key and value projections as one matrix product. The arithmetic
is the same as the plain forward pass's (scores, softmax, weighted sum), the first layer's
attention in float32, summed in another order.

The prefix sums are ``n``-fold less arithmetic but memory-bound: a batch of deletions writes and reads
tensors of (deletions x queries x hidden) float32 values a dozen times over. A fused attention kernel
on a GPU's tensor cores, in half precision, does the ``n``-fold arithmetic in less time than those
passes over memory take; there the first layer runs as a plain attention pass
over each deletion's rows, still assembled from the ``2n`` shared embeddings (no lookup, position
embedding or LayerNorm per deletion). Everywhere else the prefix sums win (see :func:`prefix_sums_on`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from rankformer.model.forward import encoder

# what SharedDeletions reads of each layer it runs (BertLayer's parts)
_LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.self.num_attention_heads",
    "attention.self.attention_head_size",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "intermediate.intermediate_act_fn",
    "output.dense",
    "output.LayerNorm",
)


def shareable(model: torch.nn.Module, layer: int) -> bool:
    """Whether ``hidden_states[layer]`` of ``model``'s deletions can go through :class:`SharedDeletions`:
    a Hugging Face BERT encoder in eval mode with absolute positions and at least one layer below
    ``layer``; anything else runs the plain way."""
    body: Any = encoder(model)
    cfg = getattr(body, "config", None)
    layers = getattr(getattr(body, "encoder", None), "layer", None)
    if cfg is None or layers is None or layer < 1 or body.training or getattr(cfg, "is_decoder", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False
    if not hasattr(getattr(body, "embeddings", None), "position_embeddings"):
        return False
    for below in list(layers)[:layer]:
        for part in _LAYER_PARTS:
            node: Any = below
            for name in part.split("."):
                node = getattr(node, name, None)
            if node is None:
                return False
    return True


# The way a cell's deletions take the first layer's attention, None: by :func:`prefix_sums_on`'s rule
# ("prefix-sums" or "attention-pass" override it: the GPU benchmark times both in one run).
FIRST_LAYER: str | None = None


def prefix_sums_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a cell's deletions share the first layer's attention by prefix sums (else: a plain
    attention pass over each deletion's shared input rows) for a model on ``device`` computing in
    ``dtype``. The attention pass only on a CUDA device in half precision, where the fused attention
    kernels beat the prefix sums' extra arithmetic; in float32 and on CPU the prefix sums are faster
    (`benchmarks/bench_perturb.py` times both ways in one run)."""
    if FIRST_LAYER is not None:
        return FIRST_LAYER == "prefix-sums"
    return not (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16))


class SharedDeletions:
    """The deletions of one cell (``cell``: its token ids, on the model's device): states at
    ``hidden_states[layer]`` of any run of consecutive deletions, the first layer's inputs shared
    between them and, with ``prefix_sums`` (by default as :func:`prefix_sums_on` decides for the cell's
    device and the model's dtype), its projections and scores too."""

    @torch.no_grad()
    def __init__(
        self, model: torch.nn.Module, cell: torch.Tensor, layer: int, prefix_sums: bool | None = None
    ) -> None:
        body: Any = encoder(model)
        self.cell = cell
        self.layers = list(body.encoder.layer)[:layer]
        first = self.layers[0]
        sa = first.attention.self
        self.n = n = len(cell) - 1
        self.heads, self.dh = int(sa.num_attention_heads), int(sa.attention_head_size)
        ids = torch.stack([cell[:n], cell[1:]]).long()  # o rows, s rows
        pos = torch.arange(n, device=cell.device)[None].expand(2, -1)
        self.x = body.embeddings(input_ids=ids, position_ids=pos)  # (2, n, d), the model's dtype
        if prefix_sums is None:
            prefix_sums = prefix_sums_on(cell.device, self.x.dtype)
        self.prefix_sums = prefix_sums
        if self.prefix_sums:
            q, k, v = (t.float() for t in _qkv(sa, self.x))  # (2, heads, n, dh), float32
            self.q, self.k = q * self.dh**-0.5, k
            self.v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # a ones column: the normaliser

    def variants(self, p0: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids of the deletions of positions ``p0 .. p0+count-1`` and where each of their
        tokens stood in the cell: two (count, n) tensors on the cell's device."""
        j = torch.arange(self.n, device=self.cell.device)
        pos = j + (j >= torch.arange(p0, p0 + count, device=j.device)[:, None])
        return self.cell[pos], pos

    @torch.no_grad()
    def states(self, p0: int, count: int) -> torch.Tensor:
        """``hidden_states[layer]`` (float32) of the deletions of positions ``p0 .. p0+count-1``,
        one row each: (count, n, d)."""
        n, p1 = self.n, p0 + count
        if not 0 <= p0 < p1 <= n + 1:
            raise ValueError(f"deletions {p0}..{p1 - 1} are not positions of a {n + 1}-token cell")
        # rows below p0 are o-rows in every deletion of the band, rows from p1-1 on s-rows; between,
        # row i is an o-row in deletion p if i < p
        i = torch.arange(p0, p1 - 1, device=self.x.device)
        # (count, count-1, 1)
        below = (i[None] < torch.arange(p0, p1, device=self.x.device)[:, None])[..., None]
        x_o, x_s = self.x[0][None].expand(count, -1, -1), self.x[1][None].expand(count, -1, -1)
        x = torch.cat(
            [x_o[:, :p0], torch.where(below, x_o[:, p0 : p1 - 1], x_s[:, p0 : p1 - 1]), x_s[:, p1 - 1 :]], 1
        )
        if not self.prefix_sums:
            h = _layer(self.layers[0], x)
        else:
            # deletion p reads o-rows below p and s-rows from p on: o-queries and o-keys below p1-1
            # serve some deletion of the band, s-queries and s-keys from p0 on
            ctx_o = self._attend(self.q[0, :, : p1 - 1], p0, p1)  # (count, p1-1, heads, dh)
            ctx_s = self._attend(self.q[1, :, p0:], p0, p1)  # (count, n-p0, heads, dh)
            mid = p1 - 1 - p0
            ctx = torch.cat(
                [
                    ctx_o[:, :p0],
                    torch.where(below[..., None], ctx_o[:, p0:], ctx_s[:, :mid]),
                    ctx_s[:, mid:],
                ],
                1,
            )
            h = _after_attention(self.layers[0], ctx.reshape(count, n, -1).to(x.dtype), x)
        for layer in self.layers[1:]:
            h = _layer(layer, h)
        return h.float()

    def _attend(self, q: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
        """Attention of queries ``q`` (heads, m, dh) in each deletion p0..p1-1: (p1-p0, m, heads, dh)."""
        n = self.n
        k_o, v_o = self.k[0, :, : p1 - 1], self.v1[0, :, : p1 - 1]  # o-keys j < p1-1
        k_s, v_s = self.k[1, :, p0:], self.v1[1, :, p0:]  # s-keys j >= p0
        s_o, s_s = q @ k_o.transpose(1, 2), q @ k_s.transpose(1, 2)
        # one shift per query for every deletion of the band (softmax does not depend on it): the
        # largest score over the keys the band reads, each deletion's own largest among them
        top = torch.maximum(_amax(s_o), _amax(s_s))
        e_o, e_s = torch.exp(s_o - top), torch.exp(s_s - top)
        # below p: the keys before the band, then a running sum through it (o-keys p0 .. p1-2)
        base = e_o[..., :p0] @ v_o[:, :p0]  # (heads, m, dh+1)
        run = torch.cumsum(e_o[..., p0:, None] * v_o[:, None, p0:], 2)  # (heads, m, band, dh+1)
        below = torch.cat([base[:, :, None], base[:, :, None] + run], 2)  # (heads, m, count, dh+1)
        # from p on: the keys after the band, then a running sum back through it
        inside = min(p1, n) - p0  # s-keys inside the band: p0 .. min(p1, n)-1
        tail = e_s[..., inside:] @ v_s[:, inside:]
        back = torch.cumsum((e_s[..., :inside, None] * v_s[:, None, :inside]).flip(2), 2).flip(2)
        if inside < p1 - p0:  # the band holds p = n, the last token: no key after it
            back = torch.cat([back, back.new_zeros(*back.shape[:2], p1 - p0 - inside, back.shape[-1])], 2)
        total = below + tail[:, :, None] + back
        ctx = total[..., :-1] / total[..., -1:]
        return ctx.permute(2, 1, 0, 3)


def _amax(s: torch.Tensor) -> torch.Tensor:
    """Row maxima of scores (heads, m, keys) as (heads, m, 1); -inf where there are no keys."""
    if s.shape[-1] == 0:
        return s.new_full((*s.shape[:-1], 1), float("-inf"))
    return s.amax(-1, keepdim=True)


def _linear(lin: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, lin.weight, lin.bias)


def _norm(ln: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _after_attention(layer: Any, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rest of a BERT layer (eval mode: no dropout) from its attention's context ``ctx``, heads
    merged, for the layer's input ``x``: output projection and residual LayerNorm, then the
    feed-forward block and its residual LayerNorm."""
    ao, mid, out = layer.attention.output, layer.intermediate, layer.output
    a = _norm(ao.LayerNorm, _linear(ao.dense, ctx) + x)
    return _norm(out.LayerNorm, _linear(out.dense, mid.intermediate_act_fn(_linear(mid.dense, a))) + a)


def _layer(layer: Any, h: torch.Tensor) -> torch.Tensor:
    """A BERT layer's forward pass over unpadded rows ``h`` (b, n, d), eval mode."""
    sa = layer.attention.self
    b, n, _ = h.shape
    q, k, v = _qkv(sa, h)
    ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sa.attention_head_size**-0.5)
    return _after_attention(layer, ctx.transpose(1, 2).reshape(b, n, -1), h)


# each self-attention's query, key and value weights stacked: (the weights' identity, weight, bias)
_STACKED: weakref.WeakKeyDictionary[Any, tuple[Any, torch.Tensor, torch.Tensor | None]] = (
    weakref.WeakKeyDictionary()
)


def _qkv(sa: Any, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A self-attention's query, key and value projections of ``h`` (b, n, d) as one matrix product
    (one launch instead of three), each (b, heads, n, dh). The stacked weights are made once per
    module, again if its weights change place, type or contents."""
    lins = (sa.query, sa.key, sa.value)
    ident = tuple((lin.weight.data_ptr(), lin.weight.dtype, lin.weight._version) for lin in lins)
    kept = _STACKED.get(sa)
    if kept is None or kept[0] != ident:
        with torch.no_grad():
            biases = [lin.weight.new_zeros(len(lin.weight)) if lin.bias is None else lin.bias for lin in lins]
            bias = torch.cat(biases) if any(lin.bias is not None for lin in lins) else None
            kept = (ident, torch.cat([lin.weight for lin in lins]), bias)
        _STACKED[sa] = kept
    b, n, _ = h.shape
    qkv = torch.nn.functional.linear(h, kept[1], kept[2]).view(b, n, 3, -1, sa.attention_head_size)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)
