"""Class-conditional token generators on one GPT backbone: NAR, raster AR and 1D AR.

Neighbouring autoregression (NAR, He et al. 2025) decodes a token grid outward from its first
corner: every token of anti-diagonal d (coordinates summing to d) is generated in one forward
pass, so an n x m grid takes n + m - 1 passes instead of n * m.

    sequence   [class token; grid tokens in raster order]            (length 1 + N, no shift)
    mask       query q sees key k when diag(k) <= diag(q)            (``NeighbourMask``)
    heads      head a predicts the next token along axis (ndim - 1 - a): head 0 (right
               neighbour) reads the last block; head a > 0 reads a extra blocks, chained
    logits     target t = mean over the heads that have a source for it: head a reads the
               token one step back along its axis; the first token reads the class token
               through every head

On a 1D grid with one head the same model is a GPT with the causal mask: the raster baseline
(``order="raster"`` flattens the 2D grid) and the GPT over FlexTok's 1D tokens. A 3D (t, n, n)
grid gets a time head and decodes in 2n + t - 2 passes.

Decoding (``sample``) runs the static ``Schedule`` in compiled ``lax.fori_loop``s (one per
bucket of pass widths) with a KV cache: step 0 feeds the class token and emits the first token; step s feeds the tokens of
diagonal s - 1 (padded to a fixed width) and emits diagonal s.

The package: ``schedule`` (the geometry and the decoding schedule), ``model`` (the backbone,
its training forward and KV-cached passes; models ``nar`` and ``ar``), ``sampling`` (the pass
loop, filtering and guidance); the KV cache itself is ``vitok.nn.attention.KVCache``, filled
by the same ``Block`` that trains.
"""

from vitok.models.nar.model import TokenGenerator, build_ar, build_nar
from vitok.models.nar.sampling import (
    check_labels,
    check_sampling_options,
    filter_logits,
    guide,
    sample,
    sample_tokens,
)
from vitok.models.nar.schedule import (
    ORDERS,
    Schedule,
    decode_grid,
    head_sources,
    make_schedule,
    mix_heads,
    pass_segments,
)

__all__ = [
    "ORDERS", "Schedule", "TokenGenerator", "build_ar", "build_nar", "check_labels",
    "check_sampling_options", "decode_grid", "filter_logits", "guide", "head_sources",
    "make_schedule", "mix_heads", "pass_segments", "sample", "sample_tokens",
]  # fmt: skip
