"""Input files -> Boltz-2 processed records, with upstream's parsers and no silent fallbacks.

Upstream `boltz predict` prints and skips an input that fails to parse, and its dataset
silently featurizes input 0 instead of one that fails to tokenize or featurize. Here every
failure becomes an `InputError` that names the file and the problem.

The processed layout is upstream's (`processed/{structures,records,msa,constraints,templates,
mols}`), so upstream's `load_input` and `BoltzWriter` read it unchanged.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from Bio import SeqIO
from rdkit import Chem

from boltz_cp.data.validate import check_entities, check_fasta_record, check_schema
from boltz_cp.errors import InputError

SUFFIXES_FASTA = (".fa", ".fas", ".fasta")
SUFFIXES_YAML = (".yml", ".yaml")
ENTITY_TYPES = ("protein", "dna", "rna", "ligand")
FASTA_ENTITY_TYPES = ("protein", "dna", "rna", "ccd", "smiles")


def collect_inputs(path: Path) -> list[Path]:
    """The input files named by `path` (a file, or a directory of .fasta/.yaml files)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"input not found: {path}")
    files = sorted(p for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else [path]
    for f in files:
        if f.is_dir():
            raise InputError(f"found directory {f} among the inputs; expected .fasta or .yaml files")
        if f.suffix.lower() not in SUFFIXES_FASTA + SUFFIXES_YAML:
            raise InputError(
                f"cannot read {f}: unknown file type '{f.suffix}' (expected .fasta, .fa, .fas, .yaml or .yml)"
            )
    if not files:
        raise InputError(f"no .fasta or .yaml inputs in directory {path}")
    return files


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open() as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise InputError(f"malformed YAML in {path}: {e}") from None
    except UnicodeDecodeError:
        raise InputError(f"malformed YAML in {path}: not a text file") from None
    if isinstance(data, dict):
        check_schema(data, path)
    if not isinstance(data, dict) or not isinstance(data.get("sequences"), list) or not data["sequences"]:
        raise InputError(f"malformed input {path}: expected a mapping with a non-empty 'sequences' list")
    for i, item in enumerate(data["sequences"]):
        if not isinstance(item, dict) or len(item) != 1:
            raise InputError(f"malformed input {path}: sequences[{i}] must have exactly one entity key")
        (etype, body), = item.items()
        if etype not in ENTITY_TYPES:
            raise InputError(
                f"unknown entity type '{etype}' in {path} sequences[{i}] "
                f"(expected one of {', '.join(ENTITY_TYPES)})"
            )
        if not isinstance(body, dict) or "id" not in body:
            raise InputError(f"malformed input {path}: sequences[{i}].{etype} needs an 'id'")
        if etype == "ligand":
            if ("ccd" in body) == ("smiles" in body):
                raise InputError(f"ligand {body['id']} in {path} needs exactly one of 'ccd' or 'smiles'")
            if "smiles" in body:
                _check_smiles(path, body["id"], body["smiles"])
            elif not body["ccd"]:
                raise InputError(f"ligand {body['id']} in {path} has an empty CCD code")
        elif not isinstance(body.get("sequence"), str) or not body["sequence"].strip():
            raise InputError(f"{etype} chain {body['id']} in {path} has an empty sequence")
    check_entities(data, path, resolve_path)
    return data


def _check_smiles(path: Path, chain: Any, smiles: Any) -> None:
    if not isinstance(smiles, str) or not smiles.strip() or Chem.MolFromSmiles(smiles) is None:
        raise InputError(f"invalid SMILES {smiles!r} for ligand {chain} in {path}")


def _load_fasta(path: Path) -> list[tuple[str, str, str]]:
    """(chain id, entity type, sequence) per record, checked the way a user needs to hear about it."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(f"malformed FASTA {path}: not a text file") from None
    if not text.lstrip().startswith(">"):
        raise InputError(f"malformed FASTA {path}: the file must start with a '>' header line")
    out = []
    with path.open() as f:
        for rec in SeqIO.parse(f, "fasta"):
            header = rec.id.split("|")
            if len(header) < 2 or not header[0]:
                raise InputError(
                    f"malformed FASTA header '>{rec.description}' in {path}: expected '>CHAIN|TYPE[|MSA]' "
                    f"with TYPE one of {', '.join(FASTA_ENTITY_TYPES)}"
                )
            chain, etype = header[0], header[1].lower()
            if etype not in FASTA_ENTITY_TYPES:
                raise InputError(
                    f"unknown entity type '{header[1]}' for chain {chain} in {path} "
                    f"(expected one of {', '.join(FASTA_ENTITY_TYPES)})"
                )
            seq = str(rec.seq).strip()
            if not seq:
                raise InputError(f"chain {chain} in {path} has an empty sequence")
            if etype == "smiles":
                _check_smiles(path, chain, seq)
            check_fasta_record(path, chain, etype, seq, header[2] if len(header) > 2 else None, resolve_path)
            out.append((chain, etype, seq))
    if not out:
        raise InputError(f"malformed FASTA {path}: no records")
    return out


def required_ccd_codes(path: Path) -> set[str]:
    """CCD codes the input names beyond the canonical residues: ligands, modifications, templates."""
    codes: set[str] = set()
    if path.suffix.lower() in SUFFIXES_FASTA:
        return {seq for _, etype, seq in _load_fasta(path) if etype == "ccd"}
    data = load_yaml(path)
    for item in data["sequences"]:
        (etype, body), = item.items()
        if etype == "ligand" and "ccd" in body:
            ccd = body["ccd"]
            codes.update([ccd] if isinstance(ccd, str) else list(ccd))
        for mod in body.get("modifications", None) or []:
            codes.add(str(mod["ccd"]))
    for tpl in data.get("templates", None) or []:
        codes.update(_template_residue_names(path, tpl))
    return codes


def _template_residue_names(path: Path, tpl: dict) -> set[str]:
    import gemmi

    src = tpl.get("cif") or tpl.get("pdb")
    if src is None:
        raise InputError(f"template entry in {path} needs a 'cif' or 'pdb' file")
    src = resolve_path(src, path)
    if not src.exists():
        raise InputError(f"template file {src} named in {path} not found")
    try:
        st = gemmi.read_structure(str(src))
    except (RuntimeError, ValueError) as e:
        raise InputError(f"cannot read template {src}: {e}") from None
    return {res.name for model in st[:1] for chain in model for res in chain}


@dataclass
class ProcessedDirs:
    """Upstream's processed layout below one root."""

    root: Path

    @property
    def structures(self) -> Path:
        return self.root / "structures"

    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def msa(self) -> Path:
        return self.root / "msa"

    @property
    def constraints(self) -> Path:
        return self.root / "constraints"

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def mols(self) -> Path:
        return self.root / "mols"

    def make(self) -> ProcessedDirs:
        for d in (self.structures, self.records, self.msa, self.constraints, self.templates, self.mols):
            d.mkdir(parents=True, exist_ok=True)
        return self


def resolve_path(name: str | Path, input_path: Path) -> Path:
    """A path named in an input file: relative to the working directory (as upstream reads it),
    else relative to the input file's folder."""
    p = Path(name).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (input_path.parent / p).resolve()


def _embed_seeded(mol, seed: int) -> bool:
    """ETKDGv3 embedding + UFF relaxation of a SMILES ligand, seeded.

    NOTE(parity): upstream embeds with RDKit's default random seed, so its SMILES conformers
    change from run to run; here they are a function of `seed`. Same conformer naming as
    upstream ("Computed"), which its featurizer prefers.
    """
    from rdkit.Chem import AllChem

    params = AllChem.ETKDGv3()
    params.clearConfs = False
    params.randomSeed = seed
    conf_id = AllChem.EmbedMolecule(mol, params)
    if conf_id == -1:
        params.useRandomCoords = True
        conf_id = AllChem.EmbedMolecule(mol, params)
    if conf_id == -1:
        return False
    try:
        AllChem.UFFOptimizeMolecule(mol, confId=conf_id, maxIters=1000)
    except (RuntimeError, ValueError):
        pass  # keep the unrelaxed embedding, as upstream does
    conf = mol.GetConformer(conf_id)
    conf.SetProp("name", "Computed")
    conf.SetProp("coord_generation", "ETKDGv3")
    return True


@contextmanager
def seeded_conformers(seed: int):
    """Within the block, boltz's SMILES parser embeds conformers with `seed`."""
    import boltz.data.parse.schema as schema

    original = schema.compute_3d_conformer
    schema.compute_3d_conformer = lambda mol, version="v3": _embed_seeded(mol, seed)
    try:
        yield
    finally:
        schema.compute_3d_conformer = original


@contextmanager
def molecular_weight_shim():
    """Within the block, `rdkit.Chem.AllChem.Descriptors` exists.

    Upstream's schema parser computes the affinity binder's molecular weight as
    `AllChem.Descriptors.MolWt(...)`; recent RDKit (2026.09 here) no longer exposes the
    Descriptors module through AllChem, so every affinity input fails to parse with an
    AttributeError. The attribute is lent for the duration of the parse only.
    """
    from rdkit.Chem import AllChem, Descriptors

    lent = not hasattr(AllChem, "Descriptors")
    if lent:
        AllChem.Descriptors = Descriptors
    try:
        yield
    finally:
        if lent:
            del AllChem.Descriptors


def parse_target(path: Path, mol_dir: Path, seed: int = 0):
    """Parse one input with boltz's own parsers (molecules must already be in `mol_dir`)."""
    from boltz.data.mol import load_canonicals
    from boltz.data.parse.fasta import parse_fasta
    from boltz.data.parse.schema import parse_boltz_schema

    canonicals = load_canonicals(mol_dir)
    with seeded_conformers(seed), molecular_weight_shim():
        return _parse(path, mol_dir, canonicals, parse_fasta, parse_boltz_schema)


def _parse(path, mol_dir, canonicals, parse_fasta, parse_boltz_schema):
    try:
        if path.suffix.lower() in SUFFIXES_FASTA:
            _load_fasta(path)
            return parse_fasta(path, canonicals, mol_dir, True)
        data = load_yaml(path)
        for item in data["sequences"]:
            (_, body), = item.items()
            if isinstance(body.get("msa"), str) and body["msa"] != "empty":
                body["msa"] = str(resolve_path(body["msa"], path))
        for tpl in data.get("templates", None) or []:
            for key in ("cif", "pdb"):
                if key in tpl:
                    tpl[key] = str(resolve_path(tpl[key], path))
        return parse_boltz_schema(path.stem, data, canonicals, mol_dir, True)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- upstream raises bare ValueError/AssertionError/KeyError
        raise InputError(f"cannot parse {path}: {type(e).__name__}: {e}") from None


def write_processed(target, path: Path, dirs: ProcessedDirs, max_msa_seqs: int = 8192):
    """Dump the parsed target in upstream's processed layout; returns its Record."""
    from boltz.data import const
    from boltz.data.parse.a3m import parse_a3m
    from boltz.data.parse.csv import parse_csv

    record = target.record
    prot = const.chain_type_ids["PROTEIN"]
    for chain in record.chains:
        if chain.msa_id == 0:
            if chain.mol_type == prot:
                raise InputError(
                    f"protein chain {chain.chain_name} in {path} has no MSA: give an .a3m/.csv file "
                    "(`msa: path` in YAML, '>A|protein|path.a3m' in FASTA) or `msa: empty` for "
                    "single-sequence mode, or use_msa_server=true to get it from an MSA server"
                )
            chain.msa_id = -1

    msa_map = {}
    for idx, msa_id in enumerate(sorted({c.msa_id for c in record.chains if c.msa_id != -1})):
        src = resolve_path(msa_id, path)
        if not src.exists():
            raise InputError(f"MSA file {src} named in {path} not found")
        name = f"{record.id}_{idx}"
        try:
            if src.suffix == ".a3m":
                msa = parse_a3m(src, taxonomy=None, max_seqs=max_msa_seqs)
            elif src.suffix == ".csv":
                msa = parse_csv(src, max_seqs=max_msa_seqs)
            else:
                raise InputError(f"MSA file {src} must be .a3m or .csv")
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot parse MSA {src}: {type(e).__name__}: {e}") from None
        msa.dump(dirs.msa / f"{name}.npz")
        msa_map[msa_id] = name
    for chain in record.chains:
        if chain.msa_id != -1:
            chain.msa_id = msa_map[chain.msa_id]

    for template_id, template in (target.templates or {}).items():
        template.dump(dirs.templates / f"{record.id}_{template_id}.npz")
    target.residue_constraints.dump(dirs.constraints / f"{record.id}.npz")
    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
    with (dirs.mols / f"{record.id}.pkl").open("wb") as f:
        pickle.dump(target.extra_mols, f)
    target.structure.dump(dirs.structures / f"{record.id}.npz")
    record.dump(dirs.records / f"{record.id}.json")
    return record


def prepare_tokenized(record, dirs: ProcessedDirs, mol_dir: Path, method: str | None = None,
                      affinity_dir: Path | None = None):
    """Load a processed record, tokenize it and gather its molecules, as upstream's inference
    dataset does: (tokenized, molecules, pocket constraints, contact constraints).

    With ``affinity_dir`` (a predictions folder holding `<id>/pre_affinity_<id>.npz`) the
    predicted structure is read instead and cropped around the affinity binder, as upstream's
    affinity dataset does (boltz_cp/data/affinity.py)."""
    from boltz.data import const
    from boltz.data.mol import load_canonicals, load_molecules
    from boltz.data.module.inferencev2 import load_input
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer

    if method is not None and method.lower() not in const.method_types_ids:
        raise InputError(f"unknown method '{method}'; choose one of {sorted(const.method_types_ids)}")
    data = load_input(
        record=record,
        target_dir=dirs.structures if affinity_dir is None else Path(affinity_dir),
        msa_dir=dirs.msa,
        constraints_dir=dirs.constraints,
        template_dir=dirs.templates,
        extra_mols_dir=dirs.mols,
        affinity=affinity_dir is not None,
    )
    try:
        tokenized = Boltz2Tokenizer().tokenize(data)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot tokenize {record.id}: {type(e).__name__}: {e}") from None
    if affinity_dir is not None:
        tokenized = crop_for_affinity(tokenized, record.id)
    molecules = dict(load_canonicals(mol_dir))
    molecules.update(data.extra_mols)
    missing = set(tokenized.tokens["res_name"].tolist()) - set(molecules)
    try:
        molecules.update(load_molecules(mol_dir, missing))
    except ValueError as e:
        raise InputError(f"{record.id}: {e}") from None
    options = record.inference_options
    pocket = options.pocket_constraints if options is not None else None
    contact = options.contact_constraints if options is not None else None
    return tokenized, molecules, pocket, contact


# Upstream's affinity pass: PredictionDataset(affinity=True) crops with these.
AFFINITY_MAX_TOKENS = 256
AFFINITY_MAX_ATOMS = 2048


def crop_for_affinity(tokenized, record_id: str):
    """Upstream's AffinityCropper on a tokenized predicted structure; InputError if it fails."""
    from boltz.data.crop.affinity import AffinityCropper

    try:
        return AffinityCropper().crop(tokenized, max_tokens=AFFINITY_MAX_TOKENS, max_atoms=AFFINITY_MAX_ATOMS)
    except Exception as e:  # noqa: BLE001 -- upstream raises bare ValueError / IndexError
        raise InputError(f"cannot crop {record_id} around its affinity binder: {type(e).__name__}: {e}") from None


def featurize(record, dirs: ProcessedDirs, mol_dir: Path, seed: int, method: str | None = None) -> dict:
    """Tokenize and featurize one record as upstream's inference dataset does; returns a batch of 1.

    Upstream's featurizer draws the per-residue random rotation of `ref_pos` from torch's global
    RNG and the conformer choice from `np.random.default_rng(42)`; seeding torch here makes the
    features a function of `seed` alone.
    """
    import numpy as np
    import torch
    from boltz.data.module.inferencev2 import collate

    tokenized, molecules, pocket, contact = prepare_tokenized(record, dirs, mol_dir, method)
    torch.manual_seed(seed)
    try:
        features = upstream_features(tokenized, molecules, np.random.default_rng(42), pocket, contact, method)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot featurize {record.id}: {type(e).__name__}: {e}") from None
    features["record"] = record
    return collate([features])


def upstream_features(tokenized, molecules, random, pocket, contact, method, affinity: bool = False) -> dict:
    """Upstream's inference featurization of one tokenized input (Boltz2Featurizer.process with
    the settings of its inference dataset; `affinity`: the affinity pass's features)."""
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import Boltz2Featurizer

    return Boltz2Featurizer().process(
        tokenized, molecules=molecules, random=random, training=False, max_atoms=None, max_tokens=None,
        max_seqs=const.max_msa_seqs, pad_to_max_seqs=False, single_sequence_prop=0.0, compute_frames=True,
        inference_pocket_constraints=pocket, inference_contact_constraints=contact,
        compute_constraint_features=True, override_method=method, compute_affinity=affinity)


NON_TENSOR_KEYS = frozenset(
    {
        "all_coords",
        "all_resolved_mask",
        "crop_to_all_atom_map",
        "chain_symmetries",
        "amino_acids_symmetries",
        "ligand_symmetries",
        "record",
        "affinity_mw",
    }
)


def batch_to(batch: dict, device) -> dict:
    """Move the tensor features of a batch to `device` (upstream's transfer_batch_to_device rule)."""
    return {k: (v if k in NON_TENSOR_KEYS else v.to(device)) for k, v in batch.items()}
