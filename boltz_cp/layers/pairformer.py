"""CP twins of upstream's PairformerLayer / PairformerModule and their no-sequence variants.

Placements (mesh axes cp_i, cp_j):
    s [B, N, C_s] SINGLE_BY_I in/out (bit-identical on the ranks of a tile row);
    z [B, N, N, C_z] PAIR in/out; mask [B, N] SINGLE_BY_I (token mask, as float);
    pair_mask [B, N, N] PAIR. N is padded to layout.n_padded; pad tokens have mask 0.
Communication per layer: that of its sublayers (triangle multiplications: Cannon rings;
triangle attention: k/v/mask and bias rings; attention with pair bias: one transpose of
k_in/mask and a row merge of partial softmax results). Transitions, norms, residuals: none.
Upstream twin: boltz/model/layers/pairformer.py PairformerLayer, PairformerModule,
PairformerNoSeqLayer, PairformerNoSeqModule (Boltz-2: v2 attention).

Each CP layer is built by upstream's __init__ and then has its sublayers replaced by their CP
twins under the same attribute names, so upstream state dicts load unchanged (strict).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from boltz.model.layers import pairformer as upstream
from boltz_cp.distributed import PAIR, SINGLE_BY_I, TokenLayout, check_placements, pair_from_tile
from boltz_cp.errors import ConfigError
from boltz_cp.layers._dropout import draw_like_upstream_dropout
from boltz_cp.layers._dtensor import like
from boltz_cp.layers.attentionv2 import AttentionPairBias
from boltz_cp.layers.transition import Transition
from boltz_cp.layers.triangular_attention import TriangleAttentionEndingNode, TriangleAttentionStartingNode
from boltz_cp.layers.triangular_mult import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing


def _install_pair_twins(layer: nn.Module, token_z: int, head_width: int, num_heads: int) -> None:
    layer.tri_mul_out = TriangleMultiplicationOutgoing(token_z)
    layer.tri_mul_in = TriangleMultiplicationIncoming(token_z)
    layer.tri_att_start = TriangleAttentionStartingNode(token_z, head_width, num_heads, inf=1e9)
    layer.tri_att_end = TriangleAttentionEndingNode(token_z, head_width, num_heads, inf=1e9)
    layer.transition_z = Transition(token_z, token_z * 4)


def residual_add(z_tile: torch.Tensor, update: torch.Tensor, owned: bool) -> torch.Tensor:
    """z_tile + update, in place when z_tile is ours to overwrite and the sum keeps its dtype
    (same values as the out-of-place add; no second tile while the update is alive)."""
    if owned and torch.promote_types(z_tile.dtype, update.dtype) == z_tile.dtype and z_tile.shape == update.shape:
        return z_tile.add_(update)
    return z_tile + update


def _pair_stack(layer: nn.Module, z: DTensor, pair_mask: DTensor, layout: TokenLayout,
                consume: bool = False) -> DTensor:
    """z += each pair sublayer in upstream's order (inference: no dropout, but upstream's dropout
    draws, so the global RNG advances as in the serial model). ``consume``: the caller gives up
    z, so its tile is updated in place; otherwise the first residual makes a new tile and the
    rest update that one (never two z tiles alive besides the caller's)."""
    z_tile = z.to_local()
    del z  # only the tile below stays referenced from here
    batch, n = z_tile.shape[0], layout.n
    owned = consume
    for sub, shape in ((layer.tri_mul_out, (batch, n, 1, 1)), (layer.tri_mul_in, (batch, n, 1, 1)),
                       (layer.tri_att_start, (batch, n, 1, 1)), (layer.tri_att_end, (batch, 1, n, 1))):
        draw_like_upstream_dropout(shape, z_tile.device)
        z_tile = residual_add(z_tile, sub(pair_from_tile(z_tile, layout.mesh), pair_mask, layout).to_local(), owned)
        owned = True
    z_tile = residual_add(z_tile, layer.transition_z(pair_from_tile(z_tile, layout.mesh)).to_local(), owned)
    return pair_from_tile(z_tile, layout.mesh)


class PairformerLayer(upstream.PairformerLayer):
    """One pairformer block on tiles; see the module docstring for placements."""

    def __init__(self, token_s: int, token_z: int, num_heads: int = 16, dropout: float = 0.25,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4,
                 post_layer_norm: bool = False, v2: bool = False) -> None:
        if not v2:
            raise ConfigError("the CP pairformer implements Boltz-2's layer (v2=True) only")
        super().__init__(token_s, token_z, num_heads, dropout, pairwise_head_width, pairwise_num_heads,
                         post_layer_norm, v2)
        self.attention = AttentionPairBias(token_s, token_z, num_heads)
        _install_pair_twins(self, token_z, pairwise_head_width, pairwise_num_heads)
        self.transition_s = Transition(token_s, token_s * 4)

    def forward(self, s: DTensor, z: DTensor, mask: DTensor, pair_mask: DTensor,  # type: ignore[override]
                layout: TokenLayout, consume: bool = False) -> tuple[DTensor, DTensor]:
        """``consume``: z's tile may be updated in place (the caller no longer needs the input)."""
        check_placements("PairformerLayer.s", s, SINGLE_BY_I)
        check_placements("PairformerLayer.z", z, PAIR)
        z = _pair_stack(self, z, pair_mask, layout, consume)
        # Upstream runs the single track in fp32 with autocast off; promote, never demote (fp64 stays).
        dtype = torch.promote_types(s.dtype, torch.float32)
        with torch.autocast(z.device.type, enabled=False):
            s_tile = s.to_local().to(dtype)
            s_normed = like(s, self.pre_norm_s(s_tile))
            m = like(mask, mask.to_local().to(dtype))
            zf = like(z, z.to_local().to(dtype))
            s_tile = s_tile + self.attention(s_normed, zf, m, s_normed, layout).to_local()
            s_tile = s_tile + self.transition_s(like(s, s_tile)).to_local()
            s_tile = self.s_post_norm(s_tile)
        return like(s, s_tile), z


class PairformerModule(upstream.PairformerModule):
    """`num_blocks` CP pairformer layers; the triangle-attention chunking is the layers' own."""

    def __init__(self, token_s: int, token_z: int, num_blocks: int, num_heads: int = 16, dropout: float = 0.25,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4, post_layer_norm: bool = False,
                 activation_checkpointing: bool = False, v2: bool = False, **kwargs) -> None:
        super().__init__(token_s, token_z, 0, num_heads, dropout, pairwise_head_width, pairwise_num_heads,
                         post_layer_norm, activation_checkpointing, v2, **kwargs)
        self.num_blocks = num_blocks
        self.layers = nn.ModuleList(
            PairformerLayer(token_s, token_z, num_heads, dropout, pairwise_head_width, pairwise_num_heads,
                            post_layer_norm, v2)
            for _ in range(num_blocks)
        )

    def forward(self, s: DTensor, z: DTensor, mask: DTensor, pair_mask: DTensor,  # type: ignore[override]
                layout: TokenLayout, consume: bool = False) -> tuple[DTensor, DTensor]:
        """``consume``: z's tile may be updated in place (the caller gives up the input); the
        later layers always update the stack's own tile in place."""
        for k, layer in enumerate(self.layers):
            s, z = layer(s, z, mask, pair_mask, layout, consume=consume or k > 0)
        return s, z


class PairformerNoSeqLayer(upstream.PairformerNoSeqLayer):
    """Pair-only block (MSA, template and confidence modules)."""

    def __init__(self, token_z: int, dropout: float = 0.25, pairwise_head_width: int = 32,
                 pairwise_num_heads: int = 4, post_layer_norm: bool = False) -> None:
        super().__init__(token_z, dropout, pairwise_head_width, pairwise_num_heads, post_layer_norm)
        _install_pair_twins(self, token_z, pairwise_head_width, pairwise_num_heads)

    def forward(self, z: DTensor, pair_mask: DTensor, layout: TokenLayout,  # type: ignore[override]
                consume: bool = False) -> DTensor:
        check_placements("PairformerNoSeqLayer.z", z, PAIR)
        return _pair_stack(self, z, pair_mask, layout, consume)


class PairformerNoSeqModule(upstream.PairformerNoSeqModule):
    def __init__(self, token_z: int, num_blocks: int, dropout: float = 0.25, pairwise_head_width: int = 32,
                 pairwise_num_heads: int = 4, post_layer_norm: bool = False,
                 activation_checkpointing: bool = False, **kwargs) -> None:
        super().__init__(token_z, 0, dropout, pairwise_head_width, pairwise_num_heads, post_layer_norm,
                         activation_checkpointing, **kwargs)
        self.num_blocks = num_blocks
        self.layers = nn.ModuleList(
            PairformerNoSeqLayer(token_z, dropout, pairwise_head_width, pairwise_num_heads, post_layer_norm)
            for _ in range(num_blocks)
        )

    def forward(self, z: DTensor, pair_mask: DTensor, layout: TokenLayout,  # type: ignore[override]
                consume: bool = False) -> DTensor:
        for k, layer in enumerate(self.layers):
            z = layer(z, pair_mask, layout, consume=consume or k > 0)
        return z
