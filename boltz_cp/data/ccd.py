"""Offline residue/ligand cache: CCD molecules from biotite in the layout Boltz-2 reads.

Upstream ``boltz predict`` downloads ``mols.tar`` into its cache (``~/.boltz`` or
``$BOLTZ_CACHE``) and unpacks it to ``<cache>/mols/<CODE>.pkl``: one pickled RDKit ``Mol`` per
Chemical Component Dictionary (CCD) code. Boltz-2 reads that folder through
``boltz.data.mol.load_canonicals`` / ``load_molecules`` (parser: ``parse_polymer``,
``parse_ccd_residue``; featurizer: ``process_atom_features``). Here we build the same files
offline from the CCD bundled with biotite (``biotite/structure/info/components.bcif``), and only
for codes whose pickle is missing: a pickle already there (for example from upstream's real
``mols.tar``) is never replaced.

What every molecule built here guarantees (all of it is read by boltz's inference path):

* atoms in ``chem_comp_atom`` order, hydrogens included as explicit atoms (boltz strips them);
  no implicit hydrogens are invented (``NoImplicit``), deuterium becomes ``[2H]``, an ``X`` atom a
  dummy atom;
* atom property ``name`` = CCD ``atom_id`` on every atom (``parse_polymer`` and the featurizer
  look atoms up by it, so for standard residues the heavy-atom names match
  ``boltz.data.const.ref_atoms`` plus the leaving atom ``OXT`` / ``OP3``), ``alt_name`` = CCD
  ``alt_atom_id``, and ``leaving_atom`` = ``"1"``/``"0"`` from ``pdbx_leaving_atom_flag``
  (``parse_ccd_residue(drop_leaving_atoms=True)`` reads it for modified residues);
* formal charges from the CCD; bonds in ``chem_comp_bond`` order; the molecule is RDKit-sanitized
  (aromaticity perceived, then kekulized with the aromatic flags kept, the form pdbeccdutils
  gives upstream's CCD pipeline); a bond between a metal and an atom whose valence it breaks is
  turned into a dative bond, as pdbeccdutils does;
* exactly one conformer, with conformer property ``name`` = ``"Ideal"``, holding the CCD ideal
  coordinates (``pdbx_model_Cartn_*_ideal``), or the CCD model coordinates when any ideal one is
  missing (``coord_source`` says which). With neither complete (a few dozen of ~49k codes) the
  conformer is an RDKit ETKDGv3 embedding with the CCD's R/S labels imposed, named
  ``"Computed"`` as boltz's own ``compute_3d_conformer`` names it. One conformer only, because the
  featurizer picks one of ``mol.GetConformers()`` at random (and should an RDKit build drop
  conformer properties on pickling, boltz's ``get_conformer`` falls back to that same one);
* chirality tags (read by the featurizer through ``atom.GetChiralTag()``) and double-bond stereo
  assigned from that 3D conformer, with legacy stereo perception, so every atom carries the
  ``_CIPRank`` property (stereocentres also ``_CIPCode``) that boltz's chiral-atom and
  stereo-bond constraints require;
* molecule properties ``MOL_NAME`` and ``_Name`` = the code;
* pickled with ``PropertyPickleOptions.AllProps``, so atom, private, computed and conformer
  properties survive ``pickle.load``.

A code not in the CCD raises `InputError`, and so does one RDKit cannot sanitize (about 0.4% of
the bundled CCD: uncharged hypervalent N/O/B, carboranes; upstream ships those unsanitized).

Not provided: the ``symmetries`` and ``pb_*`` / ``chiral_*`` / ``stereo_*`` / ``aromatic_*`` /
``planar_*`` molecule properties of upstream's mols. Only ``boltz.data.mol.get_symmetries`` reads
them, and only when the featurizer runs with ``compute_symmetries=True``, which is the training
path; inference (``PredictionDataset``) never sets it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem

from boltz_cp.errors import InputError

__all__ = ["build_molecule", "canonical_codes", "ensure_molecules"]

_BOND_TYPES = {
    "SING": Chem.BondType.SINGLE,
    "DOUB": Chem.BondType.DOUBLE,
    "TRIP": Chem.BondType.TRIPLE,
    "QUAD": Chem.BondType.QUADRUPLE,
    "AROM": Chem.BondType.AROMATIC,
}
_ISOTOPES = {"D": 2, "T": 3}
_METALS = frozenset(
    "Li Be Na Mg Al K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn "
    "Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po Fr Ra "
    "Ac Th Pa U Np Pu Am Cm Bk Cf".split()
)
_EMBED_SEED = 0xB0172
# RDKit's stereo-perception and pickle-property switches are process-global: hold this while
# they are flipped so that threads building or writing at once see consistent settings.
_RDKIT_SETTINGS = threading.RLock()
_MAX_VALENCE_FIXES = 16


@functools.cache
def canonical_codes() -> tuple[str, ...]:
    """Codes boltz loads without being asked: its canonical tokens plus every standard
    polymer residue (the 20 amino acids, UNK, A G C U N, DA DG DC DT DN)."""
    from boltz.data import const

    polymer = [t for t in const.tokens if t not in ("<pad>", "-")]
    return tuple(dict.fromkeys([*const.canonical_tokens, *polymer]))


@dataclass(frozen=True)
class _Component:
    """The rows of one CCD component that a molecule is built from."""

    code: str
    atom_names: tuple[str, ...]
    alt_names: tuple[str, ...]
    elements: tuple[str, ...]
    charges: np.ndarray  # int
    leaving: np.ndarray  # bool
    stereo: tuple[str, ...]  # R / S / N
    ideal: np.ndarray  # (n, 3) float, NaN where the CCD has no value
    model: np.ndarray  # (n, 3) float, NaN where the CCD has no value
    bonds: tuple[tuple[int, int, str], ...]  # (atom index 1, atom index 2, value_order)


def _strings(category, name: str, n: int, default: str) -> list[str]:
    if name not in category:
        return [default] * n
    column = category[name]
    values = [str(v) for v in column.as_array(str)]
    if column.mask is not None:
        values = [default if m else v for v, m in zip(values, column.mask.array)]
    return values


def _coords(category, prefix: str, suffix: str, n: int) -> np.ndarray:
    xyz = np.full((n, 3), np.nan)
    for k, axis in enumerate("xyz"):
        name = f"{prefix}{axis}{suffix}"
        if name not in category:
            continue
        column = category[name]
        values = column.as_array(np.float64)
        if column.mask is not None:
            values = np.where(column.mask.array == 0, values, np.nan)
        xyz[:, k] = values
    return xyz


@functools.lru_cache(maxsize=4096)
def _component(code: str) -> _Component:
    """Look one code up in biotite's bundled CCD (the CCD itself is read once per process)."""
    from biotite.structure.info import get_from_ccd

    atoms = get_from_ccd("chem_comp_atom", code) if isinstance(code, str) and code else None
    if atoms is None:
        hint = ""
        if isinstance(code, str) and code.strip().upper() != code:
            if get_from_ccd("chem_comp_atom", code.strip().upper()) is not None:
                hint = f" (CCD codes are upper case: did you mean {code.strip().upper()!r}?)"
        raise InputError(
            f"unknown CCD code {code!r}: not in the Chemical Component Dictionary bundled "
            f"with biotite{hint}"
        )
    n = len(atoms["atom_id"].as_array())
    names = _strings(atoms, "atom_id", n, "")
    if len(set(names)) != n or "" in names:
        raise InputError(f"CCD code {code!r}: its atom names are missing or not unique")
    index = {name: i for i, name in enumerate(names)}

    bonds: list[tuple[int, int, str]] = []
    bond_rows = get_from_ccd("chem_comp_bond", code)
    if bond_rows is not None:
        m = len(bond_rows["atom_id_1"].as_array())
        a1 = _strings(bond_rows, "atom_id_1", m, "")
        a2 = _strings(bond_rows, "atom_id_2", m, "")
        order = _strings(bond_rows, "value_order", m, "SING")
        for x, y, o in zip(a1, a2, order):
            if x not in index or y not in index:
                raise InputError(f"CCD code {code!r}: bond {x}-{y} names an atom it does not have")
            bonds.append((index[x], index[y], o.upper()))

    charges = np.array([int(float(c)) if c not in ("", "?", ".") else 0
                        for c in _strings(atoms, "charge", n, "0")], dtype=np.int64)
    return _Component(
        code=code,
        atom_names=tuple(names),
        alt_names=tuple(_strings(atoms, "alt_atom_id", n, "")),
        elements=tuple(e.strip().upper() for e in _strings(atoms, "type_symbol", n, "")),
        charges=charges,
        leaving=np.array([v.upper() == "Y" for v in _strings(atoms, "pdbx_leaving_atom_flag", n, "N")]),
        stereo=tuple(v.upper() for v in _strings(atoms, "pdbx_stereo_config", n, "N")),
        ideal=_coords(atoms, "pdbx_model_Cartn_", "_ideal", n),
        model=_coords(atoms, "model_Cartn_", "", n),
        bonds=tuple(bonds),
    )


@contextlib.contextmanager
def _legacy_stereo() -> Iterator[None]:
    """Legacy stereo perception sets the ``_CIPRank`` atom property that boltz's chiral and
    stereo-bond constraints require; newer RDKit releases may default to the new algorithm."""
    getter = getattr(Chem, "GetUseLegacyStereoPerception", None)
    setter = getattr(Chem, "SetUseLegacyStereoPerception", None)
    if getter is None or setter is None:
        yield
        return
    previous = getter()
    setter(True)
    try:
        yield
    finally:
        setter(previous)


def _atom(comp: _Component, i: int) -> Chem.Atom:
    symbol = comp.elements[i]
    if symbol == "X":
        atom = Chem.Atom(0)
    else:
        try:
            table = Chem.GetPeriodicTable()
            number = table.GetAtomicNumber("H" if symbol in _ISOTOPES else symbol.capitalize())
        except RuntimeError:
            number = -1
        if number <= 0:
            raise InputError(f"CCD code {comp.code!r}: atom {comp.atom_names[i]} has unknown element {symbol!r}")
        atom = Chem.Atom(number)
        if symbol in _ISOTOPES:
            atom.SetIsotope(_ISOTOPES[symbol])
    atom.SetFormalCharge(int(comp.charges[i]))
    atom.SetNoImplicit(True)  # the CCD lists every hydrogen
    atom.SetProp("name", comp.atom_names[i])
    atom.SetProp("alt_name", comp.alt_names[i])
    atom.SetProp("leaving_atom", "1" if comp.leaving[i] else "0")
    return atom


def _problem_text(problems) -> str:
    return "; ".join(p.Message() for p in problems)


def _sanitize(rw: Chem.RWMol, code: str) -> None:
    """Sanitize in place. A valence error on an atom bonded to a metal is fixed the way
    pdbeccdutils fixes it: the atom-metal bond becomes a dative bond towards the metal."""
    for _ in range(_MAX_VALENCE_FIXES):
        problems = Chem.DetectChemistryProblems(rw)
        if not problems:
            break
        fixed = False
        for problem in problems:
            if problem.GetType() != "AtomValenceException":
                continue
            idx = problem.GetAtomIdx()
            atom = rw.GetAtomWithIdx(idx)
            if atom.GetSymbol() in _METALS:
                continue
            metals = [n.GetIdx() for n in atom.GetNeighbors() if n.GetSymbol() in _METALS]
            for metal in metals:
                bond = rw.GetBondBetweenAtoms(idx, metal)
                if bond.GetBondType() == Chem.BondType.DATIVE:
                    continue
                rw.RemoveBond(idx, metal)
                rw.AddBond(idx, metal, Chem.BondType.DATIVE)
                fixed = True
                break
        if not fixed:
            break
    try:
        Chem.SanitizeMol(rw)
    except Exception as e:  # noqa: BLE001 - RDKit raises several exception types here
        reason = _problem_text(Chem.DetectChemistryProblems(rw)) or str(e)
        raise InputError(f"CCD code {code!r}: RDKit cannot sanitize the molecule: {reason}") from None


def _tags_from_labels(mol: Chem.Mol, labels: tuple[str, ...]) -> None:
    """Give the atoms the CCD labels R/S as chiral tags (used only before an embedding)."""
    centers = [i for i, label in enumerate(labels) if label in ("R", "S")]
    for i in centers:
        mol.GetAtomWithIdx(i).SetChiralTag(Chem.ChiralType.CHI_TETRAHEDRAL_CW)
    Chem.AssignStereochemistry(mol, cleanIt=True, force=True)
    for i in centers:
        atom = mol.GetAtomWithIdx(i)
        if atom.HasProp("_CIPCode") and atom.GetProp("_CIPCode") != labels[i]:
            atom.InvertChirality()
    Chem.AssignStereochemistry(mol, cleanIt=True, force=True)


def _add_conformer(mol: Chem.Mol, comp: _Component) -> int:
    n = mol.GetNumAtoms()
    if np.isfinite(comp.ideal).all():
        xyz, name, source = comp.ideal, "Ideal", "ideal"
    elif np.isfinite(comp.model).all():
        xyz, name, source = comp.model, "Ideal", "model"
    else:
        _tags_from_labels(mol, comp.stereo)
        conf_id = -1
        for random_coords in (False, True):
            params = AllChem.ETKDGv3()
            params.randomSeed = _EMBED_SEED
            params.useRandomCoords = random_coords
            try:
                conf_id = AllChem.EmbedMolecule(mol, params)
            except (RuntimeError, ValueError):  # RDKit invariant violations on odd geometries
                conf_id = -1
            if conf_id >= 0:
                break
        if conf_id < 0:
            raise InputError(
                f"CCD code {comp.code!r}: the CCD has no complete coordinates for it and RDKit "
                "could not embed a conformer"
            )
        conf = mol.GetConformer(conf_id)
        conf.SetProp("name", "Computed")
        conf.SetProp("coord_source", "ETKDGv3")
        return conf_id
    conf = Chem.Conformer(n)
    conf.Set3D(True)
    conf.SetPositions(np.ascontiguousarray(xyz, dtype=np.float64))
    conf.SetProp("name", name)
    conf.SetProp("coord_source", source)
    return mol.AddConformer(conf, assignId=True)


def build_molecule(code: str) -> Chem.Mol:
    """Build the RDKit molecule for one CCD code (see the module docstring for what it carries).

    Raises `InputError` for a code not in biotite's CCD or a molecule RDKit cannot sanitize.
    """
    comp = _component(code)
    with _RDKIT_SETTINGS, _legacy_stereo(), rdBase.BlockLogs():
        rw = Chem.RWMol()
        for i in range(len(comp.atom_names)):
            rw.AddAtom(_atom(comp, i))
        for a1, a2, order in comp.bonds:
            if a1 == a2 or rw.GetBondBetweenAtoms(a1, a2) is not None:
                pair = f"{comp.atom_names[a1]}-{comp.atom_names[a2]}"
                raise InputError(f"CCD code {code!r}: bond {pair} is a self or duplicate bond")
            rw.AddBond(a1, a2, _BOND_TYPES.get(order, Chem.BondType.SINGLE))
            if order == "AROM":
                rw.GetBondBetweenAtoms(a1, a2).SetIsAromatic(True)
        _sanitize(rw, code)
        try:
            Chem.Kekulize(rw, clearAromaticFlags=False)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"CCD code {code!r}: RDKit cannot kekulize the molecule: {e}") from None
        mol = rw.GetMol()
        conf_id = _add_conformer(mol, comp)
        try:
            Chem.AssignStereochemistryFrom3D(mol, confId=conf_id)
        except (RuntimeError, ValueError) as e:  # e.g. coincident atoms in the CCD coordinates
            raise InputError(f"CCD code {code!r}: cannot assign stereochemistry from 3D: {e}") from None
        mol.SetProp("_Name", code)
        mol.SetProp("MOL_NAME", code)
    return mol


@contextlib.contextmanager
def _pickle_all_props() -> Iterator[None]:
    with _RDKIT_SETTINGS:
        previous = Chem.GetDefaultPickleProperties()
        Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
        try:
            yield
        finally:
            Chem.SetDefaultPickleProperties(previous)


def _write_new(path: Path, mol: Chem.Mol) -> bool:
    """Write `mol` to `path` unless a file is already there; never leaves a partial file.

    The pickle goes to a temporary file in the same folder and is then hard-linked into place,
    which fails rather than replaces when another process got there first; where hard links are
    unsupported it is moved with `os.replace` (atomic; the two writers' files are equivalent).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, _pickle_all_props():
            pickle.dump(mol, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_molecules(mol_dir: Path, codes: Iterable[str] = (), log: Callable[[str], None] | None = None) -> list[str]:
    """Make sure ``<mol_dir>/<CODE>.pkl`` exists for every canonical residue and every code given.

    Only missing pickles are built (an existing one is never overwritten) and each is written
    atomically, so concurrent callers and crashes are safe. Returns the codes built by this call.
    Raises `InputError` for a code not in the CCD or a molecule RDKit cannot sanitize. `log`
    hears one line before a build (the first run builds every canonical residue, ~15 s).
    """
    mol_dir = Path(mol_dir)
    wanted = list(dict.fromkeys([*canonical_codes(), *(str(c) for c in codes)]))
    missing = [c for c in wanted if not (mol_dir / f"{c}.pkl").exists()]
    for code in missing:  # fail on an unknown code before writing anything
        if not code or os.sep in code or (os.altsep and os.altsep in code) or code.startswith("."):
            raise InputError(f"invalid CCD code {code!r}")
        _component(code)
    if not missing:
        return []
    if log is not None:
        canonical = set(canonical_codes())
        first = sum(c in canonical for c in missing)
        what = [f"{first} canonical residues (first run with this cache)"] if first else []
        what += [c for c in missing if c not in canonical]
        log(f"building residue library in {mol_dir}: {', '.join(what)}")
    mol_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for code in missing:
        if _write_new(mol_dir / f"{code}.pkl", build_molecule(code)):
            built.append(code)
    return built
