"""The compact host MSA: what `featurize_lean` keeps of the MSA instead of upstream's S x N
features, and the decoders that rebuild upstream's features exactly, for a block of columns
(the tokens a rank owns) and the rows the MSA module keeps.

Upstream (`process_msa_features`, S rows after pairing, N tokens), per row x token:

    msa            [S, N] int64   residue type (0..32)                        8 bytes
    has_deletion   [S, N] bool    deletion count > 0                          1
    deletion_value [S, N] f32     pi/2 * arctan(count / 3)                    4
    msa_paired     [S, N] f32     row is a taxonomy pairing for the token's chain   4
    msa_mask       [S, N] int64   all ones                                    8
    (building them: three int64 [N, S] arrays and their torch copies, ~40 bytes more;
    profile: an int64 one-hot [S, N, 33], 264 bytes)
and O(N): profile [N, 33] f32 and deletion_mean [N] f32.

Compact (here, a batch of one, B = 1; C chains, D nonzero deletions):

    msa_residues   [B, S, N] uint8   residue type                             1 byte
    msa_paired_chain [B, S, C] uint8 is_paired per row and chain (chains in asym_id order); a
                                     token's flag is its chain's
    msa_deletions  [B, D, 3] int32   (token, row, count) of each nonzero count, sorted by token
                                     then row
    msa_mask                         implied: every real token of every row is 1
    profile, deletion_mean           as upstream (O(N)), computed here per block of tokens

The pairing (which sequence of each chain's MSA fills each row, upstream's MET/UNK fix-ups and
dummy MSAs, its deletion table) is upstream's own: `construct_paired_msa` runs unchanged with
its final array step (`prepare_msa_arrays`, which allocates the int64 [N, S] arrays) replaced
for the call by a recorder; the rows are then gathered here from the chains' int8 residues.
Values: the residue gather and the deletion lookup are exact; deletion_value is computed with
upstream's own ops (f32 tensor / 3, numpy arctan, times pi / 2) on a [tokens, S] block laid out
as upstream's, and deletion_mean is its mean over rows on that layout, so the bits are equal.

Placements: `msa_column_features` gives one rank its column block [B, S, N/p] of the five
upstream MSA features as lazy views (`shape`, `device`, `index_select(1, rows)`), which
materialise upstream's dtypes only for the rows asked (the MSA module asks for its S_r rows of
the subsample). Padding tokens read as upstream's zero padding. Communication: none.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import one_hot

MSA_DENSE_KEYS = ("msa", "has_deletion", "deletion_value", "msa_paired", "msa_mask")
MSA_COMPACT_KEYS = ("msa_residues", "msa_paired_chain", "msa_deletions")
_CHUNK_BYTES = 1 << 25  # int64 temporaries per block


# --------------------------------------------------------------------------------------------
# building the compact form


@contextmanager
def _recording_msa_arrays(record: dict):
    """Within: upstream's `prepare_msa_arrays` records its arguments and returns empty arrays."""
    from boltz.data.feature import featurizerv2

    original = featurizerv2.prepare_msa_arrays

    def recorder(tokens, pairing, is_paired, deletions, msa):
        record.update(tokens=tokens, pairing=pairing, is_paired=is_paired, deletions=deletions, msa=msa)
        empty = np.zeros((0, 0), dtype=np.int64)
        return empty, empty, empty

    featurizerv2.prepare_msa_arrays = recorder
    try:
        yield
    finally:
        featurizerv2.prepare_msa_arrays = original


def compact_msa_features(data, random, max_seqs: int) -> dict:
    """Upstream's `process_msa_features` (inference: no subset, no padding) in compact form:
    MSA_COMPACT_KEYS plus profile and deletion_mean, equal to upstream's (module docstring)."""
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import construct_paired_msa

    rec: dict = {}
    with _recording_msa_arrays(rec):
        construct_paired_msa(data=data, random=random, max_seqs=max_seqs, random_subset=False)
    tokens, msa = rec["tokens"], rec["msa"]
    chain_ids = sorted(msa)
    asym = np.asarray(tokens["asym_id"], dtype=np.int64)
    res_idx = np.asarray(tokens["res_idx"], dtype=np.int64)
    n, s = len(asym), len(rec["pairing"])
    pairing = np.array([[row[c] for c in chain_ids] for row in rec["pairing"]], dtype=np.int64).reshape(s, -1)
    paired = np.array([[row[c] for c in chain_ids] for row in rec["is_paired"]], dtype=np.uint8).reshape(s, -1)

    residues = np.empty((s, n), dtype=np.uint8)
    by_chain: dict[int, list] = {}
    for (c, seq, res), count in rec["deletions"].items():
        by_chain.setdefault(int(c), []).append((int(seq), int(res), int(count)))
    deletions = []
    for ci, c in enumerate(chain_ids):
        cols = np.nonzero(asym == c)[0]
        if not len(cols):
            continue
        chain = msa[c]
        res_types = chain.residues["res_type"].astype(np.int64)
        starts = chain.sequences["res_start"].astype(np.int64)
        width = int(res_idx[cols].max()) + 1
        table = by_chain.get(int(c))
        if table:
            table = np.array(table, dtype=np.int64)
            keys = table[:, 0] * width + table[:, 1]
            order = np.argsort(keys)
            keys, counts = keys[order], table[order, 2]
        step = max(1, _CHUNK_BYTES // (8 * len(cols)))
        r = res_idx[cols]
        for s0 in range(0, s, step):
            seqs = pairing[s0:s0 + step, ci]
            gap = seqs < 0
            at = starts[np.where(gap, 0, seqs)][:, None] + r[None, :]
            values = np.where(gap[:, None], const.token_ids["-"], res_types[np.minimum(at, len(res_types) - 1)])
            if (at >= len(res_types))[~gap].any() or (values < 0).any() or (values >= const.num_tokens).any():
                raise AssertionError(f"MSA residue out of range in chain {c}")  # upstream's assert
            residues[s0:s0 + step, cols] = values
            if table is not None and len(table):
                key = seqs[:, None] * width + r[None, :]
                pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
                hit = (keys[pos] == key) & ~gap[:, None]
                rows, tok = np.nonzero(hit)
                deletions.append(np.stack([cols[tok], rows + s0, counts[pos[rows, tok]]], axis=1))
    dels = np.concatenate(deletions) if deletions else np.zeros((0, 3), dtype=np.int64)
    dels = dels[np.lexsort((dels[:, 1], dels[:, 0]))].astype(np.int32)
    out = {
        "msa_residues": torch.from_numpy(residues),
        "msa_paired_chain": torch.from_numpy(paired),
        "msa_deletions": torch.from_numpy(dels),
    }
    out.update(_profile_and_deletion_mean(out, n))
    return out


def _profile_and_deletion_mean(compact: dict, n: int) -> dict:
    from boltz.data import const

    residues = compact["msa_residues"]
    s = residues.shape[0]
    profile = torch.empty((n, const.num_tokens), dtype=torch.float)
    deletion_mean = torch.empty((n,), dtype=torch.float)
    step = max(1, _CHUNK_BYTES // (8 * const.num_tokens * max(s, 1)))
    for c0 in range(0, n, step):  # counts are exact in f32, so blocks give upstream's bits
        c1 = min(n, c0 + step)
        block = one_hot(residues[:, c0:c1].long(), num_classes=const.num_tokens)
        profile[c0:c1] = block.float().mean(dim=0)
        del block
        counts = _token_major_counts(compact["msa_deletions"], c0, c1, torch.arange(s), s)
        deletion_mean[c0:c1] = deletion_value(counts).mean(axis=0)
    return {"profile": profile, "deletion_mean": deletion_mean}


def _token_major_counts(dels: Tensor, c0: int, c1: int, rows: Tensor, num_rows: int) -> Tensor:
    """Deletion counts of tokens [c0, c1) at `rows` (indices into the S rows) as upstream lays
    them out: an f32 [tokens, rows] tensor, returned transposed ([rows, tokens] view)."""
    lo, hi = torch.searchsorted(dels[:, 0].contiguous(), torch.tensor([c0, c1], dtype=dels.dtype, device=dels.device))
    part = dels[lo:hi].long()
    where = torch.full((num_rows,), -1, dtype=torch.long, device=dels.device)
    where[rows] = torch.arange(len(rows), device=dels.device)
    at = where[part[:, 1]]
    keep = at >= 0
    vals = part[keep, 2].float()  # f64 where a parity case's dtype mode promotes .float()
    counts = torch.zeros((c1 - c0, len(rows)), dtype=vals.dtype, device=dels.device)
    counts[part[keep, 0] - c0, at[keep]] = vals
    return counts.transpose(1, 0)


def deletion_value(counts: Tensor) -> Tensor:
    """Upstream's `np.pi / 2 * np.arctan(deletion / 3)` on an f32 tensor, the same ops."""
    if counts.device.type != "cpu":  # upstream's numpy ufunc runs on the host
        return deletion_value(counts.cpu()).to(counts.device)
    return np.pi / 2 * np.arctan(counts / 3)


# --------------------------------------------------------------------------------------------
# decoding: upstream's MSA features, whole or for one rank's columns and rows


def msa_features_block(feats: dict, cols: slice, rows: Tensor | None = None,
                       keys=MSA_DENSE_KEYS) -> dict[str, Tensor]:
    """Upstream's S x N MSA features `keys` (of MSA_DENSE_KEYS, batch of one) for token columns
    `cols` (may run past N: zero padding, as `pad_tokens` gives) and `rows` (default: all),
    from the compact keys. Memory O(len(rows) * len(cols) + D)."""
    residues = feats["msa_residues"][0]
    s, n = residues.shape
    device = residues.device
    rows = torch.arange(s, device=device) if rows is None else rows.to(device)
    c0, c1 = cols.start or 0, cols.stop if cols.stop is not None else n
    r0, r1 = min(c0, n), min(c1, n)
    real = slice(r0 - c0, r1 - c0)

    def block(dtype):
        return torch.zeros((1, len(rows), c1 - c0), dtype=dtype, device=device)

    out = {}
    if "msa" in keys:
        out["msa"] = block(torch.long)
        out["msa"][0, :, real] = residues[:, r0:r1].index_select(0, rows).long()
    if "msa_paired" in keys:
        asym = feats["asym_id"][0]
        chain = torch.searchsorted(torch.unique(asym), asym[r0:r1].contiguous())
        out["msa_paired"] = block(torch.float)
        out["msa_paired"][0, :, real] = feats["msa_paired_chain"][0].index_select(0, rows)[:, chain].float()
    if "msa_mask" in keys:
        out["msa_mask"] = block(torch.long)
        out["msa_mask"][0, :, real] = 1
    if "has_deletion" in keys or "deletion_value" in keys:
        counts = _token_major_counts(feats["msa_deletions"][0], r0, r1, rows, s)
        if "has_deletion" in keys:
            out["has_deletion"] = block(torch.bool)
            out["has_deletion"][0, :, real] = counts > 0
        if "deletion_value" in keys:
            out["deletion_value"] = block(torch.float)
            dv = out["deletion_value"]
            dv[0, :, real] = torch.as_tensor(deletion_value(counts)).to(dv.dtype)
    return {k: out[k] for k in keys}


class _LazyColumns:
    """One MSA feature of one rank's column block, [B, S, width]: materialised by index_select."""

    def __init__(self, feats: dict, cols: slice, key: str) -> None:
        self.feats, self.cols, self.key = feats, cols, key
        s = feats["msa_residues"].shape[1]
        self.shape = torch.Size((1, s, cols.stop - cols.start))
        self.device = feats["msa_residues"].device

    def index_select(self, dim: int, rows: Tensor) -> Tensor:
        if dim != 1:
            raise ValueError("compact MSA columns select rows (dim 1) only")
        return msa_features_block(self.feats, self.cols, rows, (self.key,))[self.key]


def msa_column_features(feats: dict, layout) -> dict:
    """`msa_column_blocks` from the compact keys: my column block of each MSA feature, lazy."""
    keep = {k: feats[k] for k in (*MSA_COMPACT_KEYS, "asym_id")}
    if keep["msa_residues"].shape[0] != 1:
        raise ValueError("compact MSA features hold a batch of one")
    return {key: _LazyColumns(keep, layout.cols, key) for key in MSA_DENSE_KEYS}
