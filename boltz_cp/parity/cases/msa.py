"""Parity cases `outer_product_mean`, `pair_weighted_averaging`, `msa_layer`, `msa_module`:
the MSA track.

The MSA m [B, S, N, C_m] and msa_mask [B, S, N] are placed like a pair tensor (S on cp_i, N
on cp_j), with S and N padded separately to multiples of ``mesh.token_multiple``; `shard_msa`
and `gather_msa` below move them between full tensors and tiles (tests and the parity tool).
S depends on N so that one parametrisation over N covers both shapes that matter: S = 5 (not
a multiple of 2 or 3, a whole pad block on 3x3) for N > 8, S = 2 (fewer rows than a 3x3 mesh
has row blocks) otherwise. The widths are the cases' own (the runner's presets have none for
the MSA): `widths` derives them from token_z (tiny: msa_s 8, OPM c_hidden 4, PWA 2 heads of 4;
full: Boltz-2's 64, 32, 8 x 32). MSALayer keeps upstream's fixed c_h 32 / 8 heads / c_hidden 32
and takes the triangle-attention widths of the preset. `msa_module` runs upstream's MSAModule
(2 blocks, paired feature, subsampling S = 7 rows down to 5 from the same seeded global RNG)
from raw MSA features (token ids, deletions, pairing, mask) and s_inputs.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from boltz.model.layers.outer_product_mean import OuterProductMean as UpOPM
from boltz.model.layers.pair_averaging import PairWeightedAveraging as UpPWA
from boltz.data import const
from boltz.model.modules.trunkv2 import MSALayer as UpMSALayer
from boltz.model.modules.trunkv2 import MSAModule as UpMSAModule
from boltz_cp.distributed import TokenLayout, gather_pair, pad_tokens, pair_from_tile, tile_bounds
from boltz_cp.layers.outer_product_mean import OuterProductMean
from boltz_cp.layers.pair_averaging import PairWeightedAveraging
from boltz_cp.modules.trunkv2 import MSALayer, MSAModule, msa_column_blocks
from boltz_cp.parity.reference import pair_mask, token_mask
from boltz_cp.parity.runner import register, twin_from



def widths(preset) -> tuple[int, int, int, int]:
    """(msa_s, OPM c_hidden, PWA head width, PWA heads) from token_z: Boltz-2's 64, 32, 32, 8
    at token_z 128 ("full"); 8, 4, 4, 2 at token_z 16 ("tiny")."""
    z = preset.token_z
    return z // 2, z // 4, z // 4, max(2, z // 16)


def msa_rows(n: int) -> int:
    return 5 if n > 8 else 2


def shard_msa(full: torch.Tensor, layout: TokenLayout) -> DTensor:
    """Every rank passes the same full [B, S, N, ...]; pads S and N to multiples of
    ``mesh.token_multiple`` with zeros and keeps its tile [S_r, N_c] as an MSA DTensor."""
    mesh = layout.mesh
    padded = pad_tokens(full, (1, 2), mesh.token_multiple)
    r, c = mesh.coord
    tile = padded[:, tile_bounds(padded.shape[1], mesh.rows, r), tile_bounds(padded.shape[2], mesh.cols, c)]
    return pair_from_tile(tile.clone(), mesh)


def gather_msa(dt: DTensor, layout: TokenLayout, s: int) -> torch.Tensor:
    """MSA DTensor -> full [B, S, N, ...] without padding, on every rank (tests only)."""
    return gather_pair(dt, layout.mesh, None)[:, :s, : layout.n]


def _inputs(n, preset, generator):
    s, msa_s = msa_rows(n), widths(preset)[0]
    tmask = token_mask(n, generator)
    msa_mask = (torch.rand(1, s, n, generator=generator) > 0.25).double() * tmask[:, None, :]
    return {
        "m": torch.randn(1, s, n, msa_s, generator=generator, dtype=torch.float64),
        "msa_mask": msa_mask,
        "z": torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64),
        "pair_mask": pair_mask(tmask),
    }


class _MSACase:
    inputs = staticmethod(_inputs)

    def cp_twin(self, upstream):
        return twin_from(upstream, self.make_cp())


@register("outer_product_mean")
class OuterProductMeanCase(_MSACase):
    def build(self, preset):
        msa_s, hidden, _, _ = widths(preset)
        self.args = (msa_s, hidden, preset.token_z)
        return UpOPM(*self.args)

    def make_cp(self):
        return OuterProductMean(*self.args)

    def serial(self, module, x):
        return {"z": module(x["m"], x["msa_mask"])}

    def cp(self, module, x, layout):
        z = module(shard_msa(x["m"], layout), shard_msa(x["msa_mask"], layout), layout)
        return {"z": layout.gather_pair(z)}


@register("pair_weighted_averaging")
class PairWeightedAveragingCase(_MSACase):
    def build(self, preset):
        msa_s, _, head_width, heads = widths(preset)
        self.args = (msa_s, preset.token_z, head_width, heads)
        return UpPWA(*self.args)

    def make_cp(self):
        return PairWeightedAveraging(*self.args)

    def serial(self, module, x):
        return {"m": module(x["m"], x["z"], x["pair_mask"], False)}

    def cp(self, module, x, layout):
        m = module(shard_msa(x["m"], layout), layout.shard_pair(x["z"]), layout.shard_pair(x["pair_mask"]),
                   layout)
        return {"m": gather_msa(m, layout, x["m"].shape[1])}


@register("msa_layer")
class MSALayerCase(_MSACase):
    def build(self, preset):
        self.args = (widths(preset)[0], preset.token_z, 0.0, 0.0, preset.pairwise_head_width,
                     preset.pairwise_num_heads)
        return UpMSALayer(*self.args)

    def make_cp(self):
        return MSALayer(*self.args)

    def serial(self, module, x):
        z, m = module(x["z"], x["m"], x["pair_mask"], x["msa_mask"])
        return {"z": z, "m": m}

    def cp(self, module, x, layout):
        z, m = module(layout.shard_pair(x["z"]), shard_msa(x["m"], layout), layout.shard_pair(x["pair_mask"]),
                      shard_msa(x["msa_mask"], layout), layout)
        return {"z": layout.gather_pair(z), "m": gather_msa(m, layout, x["m"].shape[1])}


# Rows the msa_module case draws and keeps: 7 -> 5 exercises upstream's random subsample.
MODULE_ROWS, MODULE_KEEP, SUBSAMPLE_SEED = 7, 5, 1234


@register("msa_module")
class MSAModuleCase(_MSACase):
    def build(self, preset):
        self.args = (widths(preset)[0], preset.token_z, preset.token_s, 2, 0.0, 0.0, preset.pairwise_head_width,
                     preset.pairwise_num_heads)
        self.kwargs = {"use_paired_feature": True, "subsample_msa": True, "num_subsampled_msa": MODULE_KEEP}
        return UpMSAModule(*self.args, **self.kwargs)

    def make_cp(self):
        return MSAModule(*self.args, **self.kwargs)

    def inputs(self, n, preset, generator):
        s = MODULE_ROWS
        tmask = token_mask(n, generator)
        return {
            "z": torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64),
            "s_inputs": torch.randn(1, n, preset.token_s, generator=generator, dtype=torch.float64),
            "token_pad_mask": tmask,
            "msa": torch.randint(const.num_tokens, (1, s, n), generator=generator),
            "has_deletion": (torch.rand(1, s, n, generator=generator) > 0.7).double(),
            "deletion_value": torch.rand(1, s, n, generator=generator, dtype=torch.float64),
            "msa_paired": (torch.rand(1, s, n, generator=generator) > 0.5).double(),
            "msa_mask": (torch.rand(1, s, n, generator=generator) > 0.2).double() * tmask[:, None, :],
        }

    def serial(self, module, x):
        torch.manual_seed(SUBSAMPLE_SEED)
        return {"z": module(x["z"], x["s_inputs"], x)}

    def cp(self, module, x, layout):
        torch.manual_seed(SUBSAMPLE_SEED)
        z = module(layout.shard_pair(x["z"]), layout.shard_single(x["s_inputs"]), msa_column_blocks(x, layout),
                   layout.shard_pair(pair_mask(x["token_pad_mask"])), layout)
        return {"z": layout.gather_pair(z)}
