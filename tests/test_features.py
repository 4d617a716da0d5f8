"""Lean featurization against upstream's dense featurizer. Tier: no process group.

Every feature both paths return must be identical (value and dtype); the compact forms must
rebuild upstream's dense maps and pair features exactly, whole and tile by tile; and the lean
path must allocate nothing of size N x N.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from boltz_cp.data.ccd import ensure_molecules
from boltz_cp.data.compact import (
    COMPACT_KEYS,
    DENSE_KEYS,
    SET_CHAIN,
    SET_TOKEN,
    dense_rows,
    index_one_hot,
    pair_feature_tile,
)
from boltz_cp.data.features import featurize_lean
from boltz_cp.data.msa_compact import MSA_COMPACT_KEYS, MSA_DENSE_KEYS, msa_features_block
from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, prepare_tokenized, write_processed
from boltz_cp.data.synthetic import synthetic_proteins_yaml
from boltz_cp.errors import InputError
from boltz_cp.parity.guards import FullSizeGuard
from data_fixtures import SMALL_A3M, SMALL_YAML

# proteins with and without MSA (one cyclic, one with a modified residue), DNA, RNA, a CCD and
# a SMILES ligand (both several tokens, so token bonds), pockets (one whose binder chain is
# also in its own pocket, so write order matters), contacts (one naming a ligand atom)
RICH_YAML = """\
version: 1
sequences:
  - protein:
      id: A
      sequence: MKTAYIAKQRQ
      msa: {msa}
  - protein:
      id: B
      sequence: GSHMSLFDFG
      msa: empty
      cyclic: true
  - protein:
      id: F
      sequence: AMKLV
      msa: empty
      modifications:
        - position: 2
          ccd: MSE
  - dna:
      id: C
      sequence: ATGC
  - rna:
      id: R
      sequence: GCAU
  - ligand:
      id: D
      ccd: ATP
  - ligand:
      id: E
      smiles: 'CC(=O)Oc1ccccc1C(=O)O'
constraints:
  - pocket:
      binder: E
      contacts: [[A, 2], [A, 5], [B, 3]]
      max_distance: 7.5
  - contact:
      token1: [A, 1]
      token2: [B, 4]
      max_distance: 9.0
      force: true
  - contact:
      token1: [D, PG]
      token2: [A, 10]
  - pocket:
      binder: A
      contacts: [[A, 4], [B, 2], [D, "C1'"]]
      max_distance: 5
      force: true
"""

CASES = {"rich": RICH_YAML, "small": SMALL_YAML}


def _processed(root: Path, name: str, text: str, mol_dir: Path):
    root.mkdir(parents=True, exist_ok=True)
    (root / "A.a3m").write_text(SMALL_A3M)
    path = root / f"{name}.yaml"
    path.write_text(text.format(msa=root / "A.a3m"))
    dirs = ProcessedDirs(root / "processed").make()
    return write_processed(parse_target(path, mol_dir), path, dirs), dirs


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory, boltz_cache):
    """(upstream features, lean features, case name, lean inputs) of one case at seed 5."""
    mol_dir = boltz_cache / "mols"
    ensure_molecules(mol_dir, ["ATP", "MSE"])
    record, dirs = _processed(tmp_path_factory.mktemp(request.param), request.param, CASES[request.param], mol_dir)
    up, lean = featurize(record, dirs, mol_dir, seed=5), featurize_lean(record, dirs, mol_dir, seed=5)
    return up, lean, request.param, (record, dirs, mol_dir)


def test_shared_features_identical(pair):
    up, lean, *_ = pair
    assert set(DENSE_KEYS) <= set(up) and not set(DENSE_KEYS) & set(lean)
    assert set(up) - set(DENSE_KEYS) - set(MSA_DENSE_KEYS) == set(lean) - set(COMPACT_KEYS) - set(MSA_COMPACT_KEYS)
    whole = msa_features_block(lean, slice(0, up["msa"].shape[2]))  # the compact MSA decoded
    for key in MSA_DENSE_KEYS:
        assert (up[key].dtype, up[key].shape) == (whole[key].dtype, whole[key].shape), key
        assert torch.equal(up[key], whole[key]), key
    assert lean["record"] == up["record"]
    for key in set(up) & set(lean) - {"record"}:
        a, b = up[key], lean[key]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        assert torch.equal(a, b), key


def test_index_maps_rebuild_dense(pair):
    up, lean, *_ = pair
    for name in ("atom_to_token", "token_to_rep_atom", "token_to_center_atom", "r_set_to_rep_atom"):
        dense = up[name]
        assert torch.equal(dense_rows(lean, name), dense), name
        rows = dense.shape[1]
        for block in (slice(0, rows // 3), slice(rows // 3, rows - 1), slice(rows - 1, rows)):
            assert torch.equal(dense_rows(lean, name, block), dense[:, block]), (name, block)
    # padding atoms map to no token, explicitly
    pad = lean["atom_pad_mask"] == 0
    assert torch.equal(lean["atom_to_token_index"] == -1, pad)
    assert (lean["atom_to_token_index"][~pad] >= 0).all()
    assert torch.equal(index_one_hot(torch.tensor([2, -1, 0]), 3), torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 0]]))


def _uneven_cuts(n: int, parts: int) -> list[int]:
    cuts = [0] + [k * n // parts + (1 if k % 2 else -1) for k in range(1, parts)] + [n]
    assert len(set(b - a for a, b in zip(cuts, cuts[1:]))) > 1  # really uneven
    return cuts


@pytest.mark.parametrize("parts", [3, 4])
def test_pair_tiles_reassemble_dense(pair, parts):
    up, lean, *_ = pair
    n = up["asym_id"].shape[1]
    cuts = _uneven_cuts(n, parts)
    keys = ("token_bonds", "type_bonds", "contact_conditioning", "contact_threshold")
    assembled = {k: torch.full_like(up[k], -7) for k in keys}
    for r0, r1 in zip(cuts, cuts[1:]):
        for c0, c1 in zip(cuts, cuts[1:]):
            tile = pair_feature_tile(lean, slice(r0, r1), slice(c0, c1))
            for k in keys:
                assert tile[k].dtype == up[k].dtype, k
                assembled[k][:, r0:r1, c0:c1] = tile[k]
    for k in keys:
        assert torch.equal(assembled[k], up[k]), k
    empty = pair_feature_tile(lean, slice(3, 3), slice(0, n))
    assert empty["contact_conditioning"].shape == (1, 0, n, 5)


def test_compact_forms_are_what_they_claim(pair):
    up, lean, case, _ = pair
    ops = lean["contact_conditioning_ops"][0]
    bonds = lean["token_bond_index"][0]
    assert len(bonds) > 0 and len(bonds) == int(up["token_bonds"].sum())
    assert torch.equal(bonds, torch.nonzero(up["token_bonds"][0, ..., 0]))  # row-major, both ways
    if case == "small":  # no constraints: upstream turns every UNSELECTED pair UNSPECIFIED
        assert len(ops) == 0 and bool(lean["contact_conditioning_unspecified"])
        assert (up["contact_conditioning"][..., 0] == 1).all()
    else:
        assert {SET_CHAIN, SET_TOKEN} <= set(ops[:, 0].tolist())
        assert not bool(lean["contact_conditioning_unspecified"])
        assert lean["contact_pair_index"].shape[-1] > 0  # forced constraints reached upstream's code


def test_msa_profile_in_blocks(pair, monkeypatch):
    """The blockwise MSA profile and deletion mean equal upstream's whole-MSA ones, bit for bit."""
    from boltz_cp.data import msa_compact

    up, lean, _, (record, dirs, mol_dir) = pair
    rows = up["msa"].shape[1]
    monkeypatch.setattr(msa_compact, "_CHUNK_BYTES", 8 * 33 * rows * 5)  # 5 tokens a block
    blocked = featurize_lean(record, dirs, mol_dir, seed=5)
    assert torch.equal(blocked["profile"], up["profile"])
    assert torch.equal(blocked["deletion_mean"], up["deletion_mean"])
    assert torch.equal(blocked["profile"], lean["profile"])


def test_method_and_seed_follow_upstream(tmp_path, boltz_cache):
    mol_dir = boltz_cache / "mols"
    record, dirs = _processed(tmp_path, "small", SMALL_YAML, mol_dir)
    up = featurize(record, dirs, mol_dir, seed=2, method="MD")
    lean = featurize_lean(record, dirs, mol_dir, seed=2, method="MD")
    assert torch.equal(up["method_feature"], lean["method_feature"])
    assert torch.equal(up["ref_pos"], lean["ref_pos"])
    other = featurize_lean(record, dirs, mol_dir, seed=3, method="MD")
    assert not torch.equal(other["ref_pos"], lean["ref_pos"])
    with pytest.raises(InputError, match="unknown method 'cryo'"):
        featurize_lean(record, dirs, mol_dir, seed=2, method="cryo")


def _lean_only(tmp_path: Path, mol_dir: Path, n: int):
    """(prepared inputs, lean features callable) for a synthetic n-token input, imports warm."""
    from boltz_cp.data import features

    record, dirs = _processed(tmp_path, f"synthetic{n}", synthetic_proteins_yaml(n), mol_dir)
    featurize_lean(record, dirs, mol_dir, seed=0)  # warm imports and numba: not traced below
    data, molecules, pocket, contact = prepare_tokenized(record, dirs, mol_dir, None)

    def run():
        torch.manual_seed(0)
        return features.lean_features(data, molecules, np.random.default_rng(42), pocket, contact, None)

    return data, run


def _numpy_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_full_size_allocation(tmp_path, boltz_cache):
    """Neither torch (dispatch guard) nor numpy (tracemalloc) allocates anything N x N.

    tracemalloc sees numpy buffers and Python objects, not torch storage; the guard sees every
    torch op. Both are shown to catch upstream's dense token features.
    """
    from boltz.data.feature.featurizerv2 import process_token_features

    mol_dir = boltz_cache / "mols"
    small, large = 300, 1200
    data, run = _lean_only(tmp_path / "s", mol_dir, small)
    with FullSizeGuard(small) as guard:
        lean = run()
    assert lean["asym_id"].shape == (small,) and guard.violations == []
    peak_small = _numpy_peak(run)

    _, run_large = _lean_only(tmp_path / "l", mol_dir, large)
    peak_large = _numpy_peak(run_large)
    # O(M) host buffers only: well under one float64 N x N array, and linear growth (4x N)
    assert peak_large < large * large * 8 / 2, f"numpy/python peak {peak_large} B at N={large}"
    assert peak_large / peak_small < 6, (peak_small, peak_large)

    def upstream_tokens():
        process_token_features(data, random=None, inference_pocket_constraints=None, inference_contact_constraints=None)

    with FullSizeGuard(small) as guard:
        upstream_tokens()
    assert guard.violations
    assert _numpy_peak(upstream_tokens) >= 2 * small * small * 8
