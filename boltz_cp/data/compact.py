"""The compact feature format: what `featurize_lean` (boltz_cp/data/features.py) emits in place
of upstream's dense token x token and atom x token features, and the decoders the model and
the tests read it with (tiles of the pair features, rows or sparse forms of the index maps).

Each dense feature of upstream and its compact form (B = 1 batch, N tokens, M atoms padded to a multiple of 32, E directed bonded token pairs,
K contact-conditioning writes, R resolved polymer tokens):

    upstream (dense)                          compact (here)
    token_bonds [B,N,N,1] f32                 token_bond_index [B,E,2] i64: the (i, j) with a bond,
    type_bonds  [B,N,N] i64                     both directions, unique, sorted row-major
                                              token_bond_type [B,E] i64: type_bonds[i, j] there
    contact_conditioning [B,N,N,5] i64        contact_conditioning_ops [B,K,5] i64 and
      (one-hot), contact_threshold [B,N,N]    contact_conditioning_op_threshold [B,K] f32: writes
      f32                                       replayed in order, see below
                                              contact_conditioning_unspecified [B] bool: no write
                                                took effect, so every pair is UNSPECIFIED
    atom_to_token [B,M,N] i64 one-hot         atom_to_token_index [B,M] i64: token of each atom,
                                                -1 for a padding atom
    token_to_rep_atom [B,N,M] i64 one-hot     token_to_rep_atom_index [B,N] i64: its disto atom
    token_to_center_atom [B,N,M] i64 one-hot  token_to_center_atom_index [B,N] i64
    r_set_to_rep_atom [B,R,M] i64 one-hot     r_set_to_rep_atom_index [B,R] i64: center atom of
                                                each resolved polymer token, in token order
    disto_target [B,N,N,1,64] f32             dropped: a training target (the distogram loss);
                                                its input, disto_coords_ensemble, is kept (a
                                                tiled torch.cdist is not bit-identical to the
                                                full one, so no tile helper is offered)

Contact conditioning: pairs start UNSELECTED with threshold 0 (UNSPECIFIED everywhere when
`contact_conditioning_unspecified`). Op k = (set_kind, set_value, p, fwd, bwd) with threshold t_k
names the token set A = {asym_id == set_value} (set_kind 2, a pocket binder chain) or
{set_value} (set_kind 1, a contact token; 0 marks padding and is skipped) and writes class fwd
onto A x {p}, then class bwd onto {p} x A, both with threshold t_k; later ops overwrite earlier
ones, as upstream's sequence of writes does. `pair_feature_tile` rebuilds any tile of the four
pair features exactly from these forms.
"""

from __future__ import annotations

import torch
from torch.nn.functional import one_hot

DENSE_KEYS = (
    "token_bonds",
    "type_bonds",
    "contact_conditioning",
    "contact_threshold",
    "atom_to_token",
    "token_to_rep_atom",
    "r_set_to_rep_atom",
    "token_to_center_atom",
    "disto_target",
)
COMPACT_KEYS = (
    "token_bond_index",
    "token_bond_type",
    "contact_conditioning_ops",
    "contact_conditioning_op_threshold",
    "contact_conditioning_unspecified",
    "atom_to_token_index",
    "token_to_rep_atom_index",
    "r_set_to_rep_atom_index",
    "token_to_center_atom_index",
)
SET_PADDING, SET_TOKEN, SET_CHAIN = 0, 1, 2




def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"tile slices must be contiguous, got step {step}")
    return start, max(start, stop)


def pair_feature_tile(lean: dict, rows: slice, cols: slice) -> dict:
    """Upstream's `token_bonds`, `type_bonds`, `contact_conditioning` (one-hot, int64) and
    `contact_threshold` restricted to [:, rows, cols], built from the compact forms.

    Memory O(tile + E + K); exact (the same values and dtypes as the dense features).
    Expects batches from `featurize_lean` (no collate padding of E).
    """
    from boltz.data import const

    info = const.contact_conditioning_info
    asym = lean["asym_id"]
    batch, n = asym.shape
    r0, r1 = _bounds(rows, n)
    c0, c1 = _bounds(cols, n)
    h, w = r1 - r0, c1 - c0
    bonds = torch.zeros((batch, h, w, 1), dtype=torch.float)
    types = torch.zeros((batch, h, w), dtype=torch.long)
    classes = torch.empty((batch, h, w), dtype=torch.long)
    threshold = torch.zeros((batch, h, w), dtype=torch.float)
    for b in range(batch):
        ij, kind = lean["token_bond_index"][b], lean["token_bond_type"][b]
        inside = (ij[:, 0] >= r0) & (ij[:, 0] < r1) & (ij[:, 1] >= c0) & (ij[:, 1] < c1)
        i, j = ij[inside, 0] - r0, ij[inside, 1] - c0
        bonds[b, i, j, 0] = 1.0
        types[b, i, j] = kind[inside]

        unspecified = bool(lean["contact_conditioning_unspecified"][b])
        classes[b] = info["UNSPECIFIED"] if unspecified else info["UNSELECTED"]
        token = torch.arange(n)
        ops = lean["contact_conditioning_ops"][b].tolist()
        for (set_kind, value, p, fwd, bwd), t in zip(ops, lean["contact_conditioning_op_threshold"][b]):
            if set_kind == SET_PADDING:
                continue
            members = (asym[b] == value) if set_kind == SET_CHAIN else (token == value)
            if c0 <= p < c1:
                sel = members[r0:r1]
                classes[b, sel, p - c0] = fwd
                threshold[b, sel, p - c0] = t
            if r0 <= p < r1:
                sel = members[c0:c1]
                classes[b, p - r0, sel] = bwd
                threshold[b, p - r0, sel] = t
    return {
        "token_bonds": bonds,
        "type_bonds": types,
        "contact_conditioning": one_hot(classes, num_classes=len(info)),
        "contact_threshold": threshold,
    }


_INDEX_MAPS = {
    # dense name: (index key, what the index points into)
    "atom_to_token": ("atom_to_token_index", "tokens"),
    "token_to_rep_atom": ("token_to_rep_atom_index", "atoms"),
    "token_to_center_atom": ("token_to_center_atom_index", "atoms"),
    "r_set_to_rep_atom": ("r_set_to_rep_atom_index", "atoms"),
}


def index_one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[..., L] int64 index (-1 = none) -> [..., L, num_classes] int64 one-hot (zero rows for -1)."""
    out = torch.zeros((*index.shape, num_classes), dtype=torch.long)
    valid = index >= 0
    out[valid] = one_hot(index[valid], num_classes=num_classes)
    return out


def dense_rows(lean: dict, name: str, rows: slice = slice(None)) -> torch.Tensor:
    """Upstream's dense one-hot map `name` (one of atom_to_token, token_to_rep_atom,
    token_to_center_atom, r_set_to_rep_atom) for a block of its rows: [B, rows, N or M] int64."""
    key, target = _INDEX_MAPS[name]
    width = lean["asym_id"].shape[1] if target == "tokens" else lean["atom_pad_mask"].shape[1]
    return index_one_hot(lean[key][:, rows], width)


def sparse_index_map(lean: dict, name: str) -> torch.Tensor:
    """Upstream's dense one-hot map `name` as a sparse COO tensor [B, L, N or M] of int64 ones:
    equal to it under `torch.bmm` / `.float()` (each row has at most one 1, so every product is
    exact) in O(L) memory. Upstream's steering potentials read atom_to_token and
    token_to_rep_atom only that way, so they run unchanged on it."""
    key, target = _INDEX_MAPS[name]
    index = lean[key]
    width = lean["asym_id"].shape[1] if target == "tokens" else lean["atom_pad_mask"].shape[1]
    b, rows = torch.nonzero(index >= 0, as_tuple=True)
    entries = torch.stack([b, rows, index[b, rows]])  # row-major and unique: already coalesced
    return torch.sparse_coo_tensor(entries, torch.ones(b.numel(), dtype=torch.long), (*index.shape, width),
                                   is_coalesced=True, check_invariants=False)


# The four pair features of upstream (dense) that a CP rank needs as tiles.
PAIR_TILE_FEATURES = ("token_bonds", "type_bonds", "contact_conditioning", "contact_threshold")


def pair_feature_tiles(feats, layout):
    """My tiles (layout: a TokenLayout) of the pair features (zero on pad tokens), as PAIR DTensors.

    From the compact forms of `featurize_lean` when present (built per tile, O(tile + bonds +
    constraints)); otherwise cut from upstream's dense [B, N, N, ...] features.
    """
    from boltz_cp.distributed import pad_tokens, pair_from_tile

    n, rows, cols = layout.n, layout.rows, layout.cols
    if "token_bond_index" in feats:
        real = pair_feature_tile(feats, slice(min(rows.start, n), min(rows.stop, n)),
                                 slice(min(cols.start, n), min(cols.stop, n)))
        h, w = rows.stop - rows.start, cols.stop - cols.start
        tiles = {k: _pad_tile(real[k], h, w) for k in PAIR_TILE_FEATURES}
    else:
        tiles = {k: pad_tokens(feats[k], (1, 2), layout.mesh.token_multiple)[:, rows, cols].clone()
                 for k in PAIR_TILE_FEATURES}
    return {k: pair_from_tile(v, layout.mesh) for k, v in tiles.items()}


def _pad_tile(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Zero-pad dims 1 and 2 of a tile of real tokens up to h x w."""
    if x.shape[1:3] == (h, w):
        return x
    out = x.new_zeros((x.shape[0], h, w, *x.shape[3:]))
    out[:, :x.shape[1], :x.shape[2]] = x
    return out
