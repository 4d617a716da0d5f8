"""The offline CCD molecule cache (`boltz_cp.data.ccd`) against boltz's own readers.

Tier: no process group. Every check here reads the pickles through boltz's loaders, parser,
tokenizer and featurizer, so a molecule boltz cannot use fails here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem

from boltz_cp.data.ccd import build_molecule, canonical_codes, ensure_molecules
from boltz_cp.errors import InputError

EXTRA = ["ATP", "SEP"]
AMINO_ACIDS = ["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
               "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL"]
NUCLEOTIDES = ["A", "G", "C", "U", "N", "DA", "DG", "DC", "DT", "DN"]


@pytest.fixture(scope="module")
def mol_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cache") / "mols"
    built = ensure_molecules(d, EXTRA)
    assert set(built) == set(canonical_codes()) | set(EXTRA)
    return d


def _load(mol_dir: Path, code: str) -> Chem.Mol:
    with (mol_dir / f"{code}.pkl").open("rb") as f:
        return pickle.load(f)  # plain pickle, as boltz does


def _ccd_atoms(code: str) -> list[tuple[str, str, bool, str]]:
    """(atom_id, element, leaving, R/S/N) straight from biotite's CCD, not through our builder."""
    from biotite.structure.info import get_from_ccd

    cols = [get_from_ccd("chem_comp_atom", code, c).as_array(str)
            for c in ("atom_id", "type_symbol", "pdbx_leaving_atom_flag", "pdbx_stereo_config")]
    return [(n, e, lv == "Y", s) for n, e, lv, s in zip(*cols)]


def _ccd_ideal(code: str) -> dict[str, np.ndarray]:
    from biotite.structure.info import get_from_ccd

    names = get_from_ccd("chem_comp_atom", code, "atom_id").as_array(str)
    xyz = np.stack([get_from_ccd("chem_comp_atom", code, f"pdbx_model_Cartn_{a}_ideal").as_array(float)
                    for a in "xyz"], axis=1)
    return dict(zip(names, xyz))


def _heavy(code: str, drop_leaving: bool) -> list[str]:
    return [n for n, e, lv, _ in _ccd_atoms(code) if e not in ("H", "D") and not (drop_leaving and lv)]


def test_canonicals_match_boltz(mol_dir):
    from boltz.data import const
    from boltz.data.mol import load_canonicals, load_molecules

    canon = load_canonicals(str(mol_dir))
    assert set(canon) == set(const.canonical_tokens)
    mols = {**canon, **load_molecules(str(mol_dir), NUCLEOTIDES)}
    for code in AMINO_ACIDS + NUCLEOTIDES + ["UNK"]:
        mol = mols[code]
        ccd = _ccd_atoms(code)
        # every CCD atom, hydrogens included, in CCD order, each carrying name and leaving flag
        assert [a.GetProp("name") for a in mol.GetAtoms()] == [n for n, *_ in ccd], code
        assert [a.GetProp("leaving_atom") for a in mol.GetAtoms()] == ["1" if lv else "0" for _, _, lv, _ in ccd]
        assert any(a.GetAtomicNum() == 1 for a in mol.GetAtoms()), code
        # heavy atoms less the leaving ones (OXT / OP3) are exactly boltz's reference atoms, in order
        names = [a.GetProp("name") for a in Chem.RemoveHs(mol, sanitize=False).GetAtoms()
                 if a.GetProp("leaving_atom") == "0"]
        if code == "UNK":  # the CCD's UNK also has a CG that boltz ignores
            assert names[: len(const.ref_atoms[code])] == const.ref_atoms[code]
        else:
            assert names == const.ref_atoms[code], code
        confs = mol.GetConformers()
        assert len(confs) == 1 and confs[0].GetProp("name") == "Ideal", code
        xyz = confs[0].GetPositions()
        assert np.isfinite(xyz).all() and np.ptp(xyz, axis=0).max() > 1.0, code
        assert all(a.HasProp("_CIPRank") for a in mol.GetAtoms()), code


def test_chirality_matches_ccd_stereo(mol_dir):
    # L-alanine from its isomeric SMILES: our ALA must match it with chirality and not D-alanine
    ala = _load(mol_dir, "ALA")
    l_ala, d_ala = Chem.MolFromSmiles("C[C@H](N)C(=O)O"), Chem.MolFromSmiles("C[C@@H](N)C(=O)O")
    heavy = Chem.RemoveHs(ala)
    assert heavy.HasSubstructMatch(l_ala, useChirality=True)
    assert not heavy.HasSubstructMatch(d_ala, useChirality=True)
    ca = next(a for a in ala.GetAtoms() if a.GetProp("name") == "CA")
    assert ca.GetChiralTag() in (Chem.ChiralType.CHI_TETRAHEDRAL_CW, Chem.ChiralType.CHI_TETRAHEDRAL_CCW)
    # and the CCD's own R/S labels, for every labelled centre of the standard residues and ATP
    checked = 0
    for code in AMINO_ACIDS + NUCLEOTIDES + ["ATP", "SEP"]:
        mol = _load(mol_dir, code)
        for atom, (name, _, _, label) in zip(mol.GetAtoms(), _ccd_atoms(code)):
            if label in ("R", "S"):
                assert atom.GetProp("_CIPCode") == label, (code, name)
                checked += 1
    assert checked >= 40


def test_parse_tokenize_featurize(mol_dir, tmp_path):
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import Boltz2Featurizer
    from boltz.data.mol import load_canonicals, load_molecules
    from boltz.data.parse.yaml import parse_yaml
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer
    from boltz.data.types import Input

    yaml = tmp_path / "multi.yaml"
    yaml.write_text(
        "version: 1\n"
        "sequences:\n"
        "  - protein: {id: A, sequence: MKTAYIAKQR, msa: empty}\n"
        "  - protein: {id: B, sequence: GSHMSLFD, msa: empty}\n"
        "  - dna: {id: C, sequence: ATGC}\n"
        "  - ligand: {id: D, ccd: ATP}\n"
        "  - ligand: {id: E, smiles: 'CC(=O)O'}\n"
        "  - protein:\n"
        "      id: F\n"
        "      sequence: ASAG\n"
        "      msa: empty\n"
        "      modifications: [{position: 2, ccd: SEP}]\n"
    )
    canonicals = load_canonicals(str(mol_dir))
    target = parse_yaml(yaml, ccd=canonicals, mol_dir=mol_dir, boltz2=True)
    inp = Input(target.structure, {}, record=target.record, residue_constraints=target.residue_constraints,
                templates=None, extra_mols=target.extra_mols)
    tokenized = Boltz2Tokenizer().tokenize(inp)
    molecules = {**canonicals, **target.extra_mols}
    names = set(tokenized.tokens["res_name"].tolist()) - set(molecules)
    molecules.update(load_molecules(str(mol_dir), names))
    feats = Boltz2Featurizer().process(
        tokenized, molecules=molecules, random=np.random.default_rng(42), training=False,
        max_atoms=None, max_tokens=None, max_seqs=const.max_msa_seqs, pad_to_max_seqs=False,
        single_sequence_prop=0.0, compute_frames=True, inference_pocket_constraints=None,
        inference_contact_constraints=None, compute_constraint_features=True,
    )

    three = const.prot_letter_to_token
    dna = const.dna_letter_to_token
    n_atp = len(_heavy("ATP", drop_leaving=False))
    expected = (
        sum(len(const.ref_atoms[three[c]]) for c in "MKTAYIAKQR" + "GSHMSLFD" + "AAG")
        + sum(len(const.ref_atoms[dna[c]]) for c in "ATGC")
        + n_atp + 4  # ATP keeps its leaving atoms as a ligand; acetic acid has 4 heavy atoms
        + len(_heavy("SEP", drop_leaving=True))
    )
    assert n_atp == 31
    assert int(feats["atom_pad_mask"].sum()) == expected == len(target.structure.atoms)

    # ATP's reference conformer: finite, non-zero, and the CCD ideal geometry up to a rigid motion
    chain = next(c for c in target.structure.chains if c["name"] == "D")
    start, num = int(chain["atom_idx"]), int(chain["atom_num"])
    assert num == n_atp
    ref = feats["ref_pos"][start:start + num].double().numpy()
    assert np.isfinite(ref).all() and (np.abs(ref).sum(axis=1) > 1e-3).all()
    dist = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    assert (dist(ref) + 10 * np.eye(num)).min() > 1.0  # no collapsed atoms
    ideal = _ccd_ideal("ATP")
    ideal = np.array([ideal[str(n)] for n in target.structure.atoms["name"][start:start + num]])
    np.testing.assert_allclose(dist(ref), dist(ideal), atol=1e-3)

    # the featurized chirality of every ALA CA is the tag of the pickled molecule
    ala_ca = next(a for a in _load(mol_dir, "ALA").GetAtoms() if a.GetProp("name") == "CA")
    want = const.chirality_type_ids[str(ala_ca.GetChiralTag())]
    atoms = target.structure.atoms
    res = target.structure.residues
    ca_rows = [int(r["atom_idx"]) + 1 for r in res if r["name"] == "ALA"]
    assert ca_rows and all(atoms["name"][i] == "CA" for i in ca_rows)
    assert all(int(feats["ref_chirality"][i]) == want for i in ca_rows)
    assert want != const.chirality_type_ids["CHI_UNSPECIFIED"]


def test_unknown_code_raises(tmp_path):
    with pytest.raises(InputError, match="XYZ1"):
        ensure_molecules(tmp_path / "mols", ["XYZ1"])
    assert not (tmp_path / "mols").exists()  # checked before anything is written
    with pytest.raises(InputError, match="'atp'.*'ATP'"):
        build_molecule("atp")


def test_existing_pickle_kept_and_files_are_plain_pickles(mol_dir, tmp_path):
    d = tmp_path / "mols"
    d.mkdir()
    sentinel = {"not": "rebuilt"}
    with (d / "ALA.pkl").open("wb") as f:
        pickle.dump(sentinel, f)
    built = ensure_molecules(d, ["ATP"])
    assert "ALA" not in built and "ATP" in built and "GLY" in built
    assert _load(d, "ALA") == sentinel
    assert ensure_molecules(d, ["ATP"]) == []  # nothing missing: nothing built
    assert not [p for p in d.iterdir() if not p.name.endswith(".pkl")]  # no temp files left
    for path in d.glob("*.pkl"):
        if path.stem != "ALA":
            assert isinstance(_load(d, path.stem), Chem.Mol)
    # conformer and atom properties survive a plain pickle round trip
    mol = _load(mol_dir, "ATP")
    assert mol.GetConformer().GetProp("name") == "Ideal"
    assert mol.GetProp("MOL_NAME") == "ATP"
    sep = _load(mol_dir, "SEP")
    assert {a.GetProp("name") for a in sep.GetAtoms() if a.GetProp("leaving_atom") == "1"} == {
        n for n, _, lv, _ in _ccd_atoms("SEP") if lv
    } != set()


def test_concurrent_callers_build_each_code_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    d = tmp_path / "mols"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: ensure_molecules(d, ["ATP"]), range(2)))
    built = [c for r in results for c in r]
    assert sorted(built) == sorted(set(canonical_codes()) | {"ATP"})  # each file written once
    assert sorted(p.name for p in d.iterdir()) == sorted(f"{c}.pkl" for c in built)
    from boltz_cp.data.ccd import _write_new

    assert _write_new(d / "ATP.pkl", build_molecule("GLY")) is False  # never replaces a file
    assert _load(d, "ATP").GetProp("MOL_NAME") == "ATP"


def test_unsanitizable_molecule_raises(monkeypatch):
    import dataclasses

    import boltz_cp.data.ccd as ccd

    ala = ccd._component("ALA")
    # make the amide nitrogen an uncharged three-bonded oxygen: RDKit rejects its valence
    broken = dataclasses.replace(ala, elements=("O",) + ala.elements[1:])
    monkeypatch.setattr(ccd, "_component", lambda code: broken)
    with pytest.raises(InputError, match=r"'ALA'.*sanitize.*valence"):
        ccd.build_molecule("ALA")
