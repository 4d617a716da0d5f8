"""Parity cases of the trunk's pair init and distogram head.

- `relpos`: RelativePositionEncoder (fix_sym_check, cyclic_pos_enc as Boltz-2 uses them) on
  B = 2 complexes of several chains, a repeated entity (sym_id 0 / 1), residue gaps beyond
  r_max and tokens sharing a residue; no cyclic chain.
- `relpos_cyclic`: the same with chain 0 cyclic (B = 1). A non-cyclic chain carries a residue
  jump of 6000, which the cyclic branch (period 10000) folds: it only matches upstream when
  the global cyclic test is evaluated on all tokens, not per tile.
- `pair_init`: outer sum z_init_1(s)[i] + z_init_2(s)[j] plus relpos (cyclic features), as
  upstream Boltz2.forward starts z_init.
- `distogram`: DistogramModule, 2 distograms of 8 bins.
"""

from __future__ import annotations

import torch
from torch import nn

from boltz.model.modules.encodersv2 import RelativePositionEncoder as UpstreamRelPos
from boltz.model.modules.trunkv2 import DistogramModule as UpstreamDistogram
from boltz_cp.distributed import pair_from_tile
from boltz_cp.modules.encodersv2 import RelativePositionEncoder, outer_sum_init, token_blocks
from boltz_cp.modules.heads import DistogramModule
from boltz_cp.parity.runner import register, twin_from

FEATURES = ("asym_id", "residue_index", "entity_id", "sym_id", "token_index", "cyclic_period")


def token_features(n: int, generator: torch.Generator, batch: int = 1, cyclic: bool = False) -> dict:
    """Random per-token relpos features [B, n] (long; cyclic_period floating, as featurized).

    Up to 4 chains of random lengths; chains 0 and 2 share entity 0 (sym_id 0 and 1);
    residue steps drawn from {0, 1, 1, 1, 3, 40} (0: several tokens per residue, 40 > r_max).
    cyclic: chain 0 is a ring of consecutive residues with period = its length, and the last
    chain (if longer than one token) jumps 6000 residues halfway.
    """
    steps = torch.tensor([0, 1, 1, 1, 3, 40])
    out = {k: [] for k in FEATURES}
    for _ in range(batch):
        n_chains = min(4, n)
        cuts = (torch.randperm(n - 1, generator=generator)[: n_chains - 1] + 1).sort().values.tolist()
        bounds = list(zip([0, *cuts], [*cuts, n]))
        asym, res = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        period = torch.zeros(n, dtype=torch.float64)
        for chain, (a, b) in enumerate(bounds):
            asym[a:b] = chain
            if cyclic and chain == 0:
                res[a:b] = torch.arange(b - a)
                period[a:b] = b - a
                continue
            draw = steps[torch.randint(len(steps), (b - a,), generator=generator)]
            draw[0] = 0
            if cyclic and chain == len(bounds) - 1 and b - a > 1:
                draw[(b - a) // 2] = 6000
            res[a:b] = torch.cumsum(draw, 0)
        entity = torch.tensor([0, 1, 0, 2])[asym]
        sym = torch.tensor([0, 0, 1, 0])[asym]
        for key, value in (("asym_id", asym), ("residue_index", res), ("entity_id", entity),
                           ("sym_id", sym), ("token_index", torch.arange(n)), ("cyclic_period", period)):
            out[key].append(value)
    return {k: torch.stack(v) for k, v in out.items()}


def _feats(x: dict) -> dict:
    return {k: x[k] for k in FEATURES}


@register("relpos")
class RelPosCase:
    batch, cyclic = 2, False

    def build(self, preset):
        return UpstreamRelPos(preset.token_z, fix_sym_check=True, cyclic_pos_enc=True)

    def cp_twin(self, upstream):
        return twin_from(upstream, RelativePositionEncoder(
            upstream.linear_layer.out_features, upstream.r_max, upstream.s_max,
            fix_sym_check=upstream.fix_sym_check, cyclic_pos_enc=upstream.cyclic_pos_enc))

    def inputs(self, n, preset, generator):
        return token_features(n, generator, self.batch, self.cyclic)

    def serial(self, module, x):
        return {"z": module(_feats(x))}

    def cp(self, module, x, layout):
        return {"z": layout.gather_pair(module(*token_blocks(_feats(x), layout), layout))}


@register("relpos_cyclic")
class RelPosCyclicCase(RelPosCase):
    batch, cyclic = 1, True


class PairInit(nn.Module):
    """The z-init parameters of Boltz2 (z_init_1, z_init_2, rel_pos), under upstream's names."""

    def __init__(self, token_s: int, token_z: int, rel_pos: nn.Module):
        super().__init__()
        self.z_init_1 = nn.Linear(token_s, token_z, bias=False)
        self.z_init_2 = nn.Linear(token_s, token_z, bias=False)
        self.rel_pos = rel_pos


@register("pair_init")
class PairInitCase:
    def build(self, preset):
        return PairInit(preset.token_s, preset.token_z,
                        UpstreamRelPos(preset.token_z, fix_sym_check=True, cyclic_pos_enc=True))

    def cp_twin(self, upstream):
        token_z, token_s = upstream.z_init_1.weight.shape
        rel_pos = RelativePositionEncoder(token_z, fix_sym_check=True, cyclic_pos_enc=True)
        return twin_from(upstream, PairInit(token_s, token_z, rel_pos))

    def inputs(self, n, preset, generator):
        x = token_features(n, generator, 1, cyclic=True)
        x["s_inputs"] = torch.randn(1, n, preset.token_s, generator=generator, dtype=torch.float64)
        return x

    def serial(self, module, x):
        s = x["s_inputs"]
        z = module.z_init_1(s)[:, :, None] + module.z_init_2(s)[:, None, :]
        return {"z": z + module.rel_pos(_feats(x))}

    def cp(self, module, x, layout):
        z = outer_sum_init(module.z_init_1, module.z_init_2, layout.shard_single(x["s_inputs"]), layout)
        z_tile = z.to_local() + module.rel_pos(*token_blocks(_feats(x), layout), layout).to_local()
        return {"z": layout.gather_pair(pair_from_tile(z_tile, layout.mesh))}


@register("distogram")
class DistogramCase:
    num_bins, num_distograms = 8, 2

    def build(self, preset):
        return UpstreamDistogram(preset.token_z, self.num_bins, self.num_distograms)

    def cp_twin(self, upstream):
        return twin_from(upstream, DistogramModule(upstream.distogram.in_features, upstream.num_bins,
                                                   upstream.num_distograms))

    def inputs(self, n, preset, generator):
        return {"z": torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64)}

    def serial(self, module, x):
        return {"distogram": module(x["z"])}

    def cp(self, module, x, layout):
        return {"distogram": layout.gather_pair(module(layout.shard_pair(x["z"]), layout))}
