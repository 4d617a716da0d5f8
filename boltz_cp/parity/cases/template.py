"""Parity cases `template_module` (T = 2), `template_module_t1` (T = 1) and `template_module_none`
(T = 1, every mask zero: no template): TemplateV2Module.

Widths: template_dim = token_z // 2 (tiny 8; full 64, Boltz-2's), 2 template blocks, the
preset's triangle-attention widths. Inputs: CB positions uniform in a 45 A cube (distances
over most of the 38 bins), CA within ~1.5 A of CB, random rotations as frames with the
frame origin at CA for even tokens (so some offsets are exactly zero, as in real data),
masks with real zeros, 2-3 visibility groups per template. With T = 2 the last template
covers only tokens 0 and 1, so its presence (`template_mask.any` over all tokens) is true
on every tile although most tiles see none of its tokens. T = 0 is not a case: upstream
fails on it and Boltz-2's featurizer always gives T >= 1.
"""

from __future__ import annotations

import torch
from torch.nn.functional import one_hot

from boltz.data import const
from boltz.model.modules.trunkv2 import TemplateV2Module as UpTemplateV2Module
from boltz_cp.modules.template import TEMPLATE_FEATURES, TemplateV2Module
from boltz_cp.parity.reference import pair_mask, token_mask
from boltz_cp.parity.runner import register, twin_from


def random_rotations(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """[*shape, 3, 3] float64 proper rotations (QR of a Gaussian, signs fixed, det +1)."""
    q, r = torch.linalg.qr(torch.randn(*shape, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    det = torch.linalg.det(q)
    q[..., :, 0] = q[..., :, 0] * det[..., None]
    return q


def template_features(n: int, templates: int, generator: torch.Generator, batch: int = 1) -> dict:
    """Random per-token template features [B, T, n, ...] (float64; restype long one-hot)."""
    shape = (batch, templates, n)
    present = (torch.rand(shape, generator=generator) > 0.2).double()
    if templates > 1:
        present[:, -1] = 0
        present[:, -1, :2] = 1
    cb = 45 * torch.rand(*shape, 3, generator=generator, dtype=torch.float64)
    ca = cb + 1.5 * torch.randn(*shape, 3, generator=generator, dtype=torch.float64)
    frame_t = ca + torch.randn(*shape, 3, generator=generator, dtype=torch.float64)
    frame_t[:, :, ::2] = ca[:, :, ::2]
    visibility = [_visibility(n, generator) for _ in range(templates)]
    visibility = torch.stack(visibility) if visibility else torch.zeros(0, n, dtype=torch.float64)
    return {
        "template_restype": one_hot(torch.randint(const.num_tokens, shape, generator=generator), const.num_tokens),
        "template_frame_rot": random_rotations(shape, generator),
        "template_frame_t": frame_t,
        "template_mask_frame": (torch.rand(shape, generator=generator) > 0.25).double() * present,
        "template_cb": cb,
        "template_ca": ca,
        "template_mask_cb": (torch.rand(shape, generator=generator) > 0.25).double() * present,
        "template_mask": present,
        "visibility_ids": visibility.expand(*shape).clone(),
    }


def _visibility(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n] ids of 2-3 non-empty contiguous groups (fewer when n < 3); one id is negative, as
    the featurizer gives untemplated chains."""
    groups = min(n, int(torch.randint(2, 4, (1,), generator=generator)))
    cuts = (torch.randperm(max(1, n - 1), generator=generator)[: groups - 1] + 1).sort().values
    ids = torch.bucketize(torch.arange(n), cuts, right=True).double()
    return torch.where(ids == 1, -2.0, ids + 3)


def _feats(x: dict) -> dict:
    return {k: x[k] for k in TEMPLATE_FEATURES}


@register("template_module")
class TemplateModuleCase:
    templates = 2

    def build(self, preset):
        self.args = dict(token_z=preset.token_z, template_dim=preset.token_z // 2, template_blocks=2, dropout=0.0,
                         pairwise_head_width=preset.pairwise_head_width,
                         pairwise_num_heads=preset.pairwise_num_heads)
        return UpTemplateV2Module(**self.args)

    def cp_twin(self, upstream):
        return twin_from(upstream, TemplateV2Module(**self.args))

    def inputs(self, n, preset, generator):
        mask = token_mask(n, generator)
        x = template_features(n, self.templates, generator)
        x["z"] = torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64)
        x["pair_mask"] = pair_mask(mask)
        return x

    def serial(self, module, x):
        return {"z": module(x["z"], _feats(x), x["pair_mask"])}

    def cp(self, module, x, layout):
        u = module(layout.shard_pair(x["z"]), _feats(x), layout.shard_pair(x["pair_mask"]), layout)
        return {"z": layout.gather_pair(u)}


@register("template_module_t1")
class TemplateModuleOneCase(TemplateModuleCase):
    templates = 1


@register("template_module_none")
class TemplateModuleNoneCase(TemplateModuleCase):
    """No template: Boltz-2's featurizer then gives T = 1 with every mask zero, and upstream's
    update is exactly zero; the CP module must give exactly zero too (nothing leaks in)."""

    templates = 1

    def inputs(self, n, preset, generator):
        x = super().inputs(n, preset, generator)
        for key in ("template_mask", "template_mask_cb", "template_mask_frame"):
            x[key] = torch.zeros_like(x[key])
        return x
