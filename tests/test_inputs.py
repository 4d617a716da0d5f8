"""Input parsing and its errors. Tier: no process group.

Every bad input must raise `InputError` with a message that names the problem; nothing may be
substituted silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from boltz_cp.data.inputs import (
    ProcessedDirs,
    collect_inputs,
    featurize,
    parse_target,
    required_ccd_codes,
    write_processed,
)
from boltz_cp.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BAD_YAML = {
    "malformed": ("version: 1\nsequences: [\n", "malformed YAML"),
    "not_a_mapping": ("- 1\n- 2\n", "non-empty 'sequences'"),
    "unknown_entity": ("version: 1\nsequences:\n  - peptide: {id: A, sequence: MK}\n", "unknown entity type 'peptide'"),
    "empty_sequence": ("version: 1\nsequences:\n  - protein: {id: A, sequence: '', msa: empty}\n", "empty sequence"),
    "bad_smiles": ("version: 1\nsequences:\n  - ligand: {id: L, smiles: 'C1CC(('}\n", "invalid SMILES"),
    "two_ligand_kinds": ("version: 1\nsequences:\n  - ligand: {id: L, smiles: C, ccd: ATP}\n", "exactly one of"),
    "no_msa": ("version: 1\nsequences:\n  - protein: {id: A, sequence: MKT}\n", "has no MSA"),
    "missing_msa": ("version: 1\nsequences:\n  - protein: {id: A, sequence: MKT, msa: nowhere.a3m}\n", "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_yaml(case, tmp_path, boltz_cache):
    text, expected = BAD_YAML[case]
    path = _write(tmp_path, f"{case}.yaml", text)
    mol_dir = boltz_cache / "mols"
    with pytest.raises(InputError, match=expected) as err:
        required_ccd_codes(path)
        target = parse_target(path, mol_dir)
        write_processed(target, path, ProcessedDirs(tmp_path / "processed").make())
    assert str(path.name) in str(err.value) or "nowhere.a3m" in str(err.value)


BAD_FASTA = {
    "no_header": ("MKTAYIAK\n", "must start with a '>'"),
    "no_type": (">A\nMKTAYIAK\n", "malformed FASTA header"),
    "unknown_type": (">A|peptide\nMKTAYIAK\n", "unknown entity type 'peptide'"),
    "empty_seq": (">A|protein|empty\n\n>B|protein|empty\nMK\n", "empty sequence"),
    "bad_smiles": (">L|smiles\nC1CC((\n", "invalid SMILES"),
}


@pytest.mark.parametrize("case", sorted(BAD_FASTA))
def test_bad_fasta(case, tmp_path, boltz_cache):
    text, expected = BAD_FASTA[case]
    path = _write(tmp_path, f"{case}.fasta", text)
    with pytest.raises(InputError, match=expected):
        required_ccd_codes(path)
        parse_target(path, boltz_cache / "mols")


def test_collect_inputs_errors(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        collect_inputs(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="unknown file type '.txt'"):
        collect_inputs(_write(tmp_path, "x.txt", "hi"))
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(InputError, match="no .fasta or .yaml"):
        collect_inputs(d)
    _write(d, "b.yaml", "x")
    _write(d, "a.fasta", "x")
    assert [p.name for p in collect_inputs(d)] == ["a.fasta", "b.yaml"]


def test_unknown_ccd_code(tmp_path, boltz_cache):
    from boltz_cp.data.ccd import ensure_molecules

    path = _write(tmp_path, "lig.yaml", "version: 1\nsequences:\n  - ligand: {id: L, ccd: ZZZZQ}\n")
    assert required_ccd_codes(path) == {"ZZZZQ"}
    with pytest.raises(InputError, match="ZZZZQ"):
        ensure_molecules(boltz_cache / "mols", required_ccd_codes(path))


def test_required_codes_example():
    codes = required_ccd_codes(REPO / "examples" / "multichain.yaml")
    assert codes == {"ATP"}
    assert required_ccd_codes(REPO / "examples" / "multichain.fasta") == {"ATP"}


def test_featurize_small(small_input, tmp_path, boltz_cache):
    """Featurization is a function of the seed alone, and the token count is the expected one."""
    mol_dir = boltz_cache / "mols"
    dirs = ProcessedDirs(tmp_path / "processed").make()
    record = write_processed(parse_target(small_input, mol_dir), small_input, dirs)
    a = featurize(record, dirs, mol_dir, seed=3)
    b = featurize(record, dirs, mol_dir, seed=3)
    c = featurize(record, dirs, mol_dir, seed=4)
    # 11 + 8 residues, 4 nucleotides, acetic acid: 4 heavy atoms, one token each
    assert int(a["token_pad_mask"].sum()) == 11 + 8 + 4 + 4
    assert a["msa"].shape[1] >= 3  # the MSA rows were read
    for k, v in a.items():
        if hasattr(v, "shape"):
            assert (v == b[k]).all(), k
    assert not (a["ref_pos"] == c["ref_pos"]).all()  # the seed drives the ref_pos rotation


def test_smiles_conformer_follows_seed(small_input, boltz_cache):
    """Upstream embeds SMILES ligands unseeded; ours is a function of the seed."""
    mol_dir = boltz_cache / "mols"

    def coords(seed):
        (mol,) = parse_target(small_input, mol_dir, seed).extra_mols.values()
        return mol.GetConformer().GetPositions()

    a, b, c = coords(1), coords(1), coords(2)
    assert (a == b).all()
    assert not (a == c).all()
