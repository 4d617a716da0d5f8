"""Boltz-2 features without the dense token x token / atom x token host tensors.

`featurize_lean` has the contract of `boltz_cp.data.inputs.featurize` (same seeding, same
errors, a batch of one) and returns every upstream feature of size O(N), O(M), O(S*N) or O(T*N)
with identical values and dtypes. Each dense feature is replaced by a compact form; the format
(keys, shapes, the contact conditioning ops) and its decoders are boltz_cp/data/compact.py.

The MSA is kept compact (uint8 residues, per-chain pairing flags, sparse deletions; upstream's
five S x N features are rebuilt per rank and per block of rows: boltz_cp/data/msa_compact.py),
its profile is computed per block of tokens, and the batch dim is added without collate's
second copy. Upstream featurizer functions are reused where they allocate nothing token x token:
ensemble, templates, residue/chain/contact constraints, the MSA pairing, non-polymer frames
(atoms x atoms of one ligand chain) and forced-contact atom pairs (binder atoms x pocket atoms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn.functional import one_hot

from boltz_cp.data.compact import SET_CHAIN, SET_TOKEN
from boltz_cp.data.msa_compact import compact_msa_features
from boltz_cp.errors import InputError

ATOMS_PER_WINDOW = 32  # upstream's atoms_per_window_queries: atoms pad to a multiple of it


# --------------------------------------------------------------------------------------------
# entry point


def featurize_lean(record, dirs, mol_dir: Path, seed: int, method: str | None = None) -> dict:
    """Tokenize and featurize one record like `inputs.featurize`, with compact pair/atom maps.

    Returns a batch of one: upstream's keys minus `DENSE_KEYS` and `MSA_DENSE_KEYS` plus
    `COMPACT_KEYS` and `MSA_COMPACT_KEYS` (see boltz_cp/data/compact.py, msa_compact.py), every
    shared key equal in value and dtype to `inputs.featurize`.
    Host memory is O(N + M + S*N bytes + T*N) plus ligand-sized terms; nothing token x token or
    atom x token is allocated.
    """
    from boltz_cp.data.inputs import prepare_tokenized

    data, molecules, pocket, contact = prepare_tokenized(record, dirs, mol_dir, method)
    torch.manual_seed(seed)  # ref_pos rotations come from torch's global RNG, as upstream
    try:
        features = lean_features(data, molecules, np.random.default_rng(42), pocket, contact, method)
    except Exception as e:  # noqa: BLE001 -- upstream raises bare ValueError/AssertionError/KeyError
        raise InputError(f"cannot featurize {record.id}: {type(e).__name__}: {e}") from None
    features["record"] = record
    return batch_of_one(features)


def lean_features(data, molecules, random, pocket, contact, method) -> dict:
    """Boltz2Featurizer.process with the inference arguments of `inputs.featurize`."""
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import (
        load_dummy_templates_features,
        process_chain_feature_constraints,
        process_contact_feature_constraints,
        process_ensemble_features,
        process_residue_constraint_features,
        process_template_features,
    )

    # same call order as upstream: both RNGs are consumed in sequence
    ensemble = process_ensemble_features(
        data=data, random=random, num_ensembles=1, ensemble_sample_replacement=False, fix_single_ensemble=True
    )
    features = _token_features(data, pocket, contact, method)
    features.update(_atom_features(data, random, ensemble, molecules))
    features.update(compact_msa_features(data, random, const.max_msa_seqs))
    n = len(data.tokens)
    if data.templates:
        features.update(process_template_features(data=data, max_tokens=n))
    else:
        features.update(load_dummy_templates_features(tdim=1, num_tokens=n))
    features.update(ensemble)
    features.update(process_residue_constraint_features(data))
    features.update(process_chain_feature_constraints(data))
    features.update(
        process_contact_feature_constraints(
            data=data,
            inference_pocket_constraints=pocket or [],
            inference_contact_constraints=contact or [],
        )
    )
    return features


def batch_of_one(features: dict) -> dict:
    """Upstream's collate for one item: tensors gain a batch dim (no second copy is kept)."""
    from boltz_cp.data.inputs import NON_TENSOR_KEYS

    out = {}
    for key in list(features):
        value = features.pop(key)
        out[key] = [value] if key in NON_TENSOR_KEYS else value.contiguous().unsqueeze(0)
    return out


# --------------------------------------------------------------------------------------------
# token features (upstream: process_token_features)


def _token_features(data, pocket, contact, method) -> dict:
    from boltz.data import const

    tokens = data.tokens
    n = len(tokens)

    def field(name, dtype=None):
        t = torch.from_numpy(np.ascontiguousarray(tokens[name]))
        return t if dtype is None else t.to(dtype)

    method_id = const.method_types_ids["x-ray diffraction" if method is None else method.lower()]
    if data.record is not None and method is None:
        m = data.record.structure.method
        if m is not None and m.lower() in const.method_types_ids:
            method_id = const.method_types_ids[m.lower()]

    cyclic_period = torch.maximum(_cyclic_lengths(data), field("cyclic_period"))  # f32, as upstream
    bond_index, bond_type = _token_bonds(data)
    ops, op_threshold, unspecified = _contact_ops(data, pocket, contact)
    return {
        "token_index": torch.arange(n, dtype=torch.long),
        "residue_index": field("res_idx", torch.long),
        "asym_id": field("asym_id", torch.long),
        "entity_id": field("entity_id", torch.long),
        "sym_id": field("sym_id", torch.long),
        "mol_type": field("mol_type", torch.long),
        "res_type": one_hot(field("res_type", torch.long), num_classes=const.num_tokens),
        "disto_center": field("disto_coords"),
        "token_bond_index": bond_index,
        "token_bond_type": bond_type,
        "token_pad_mask": torch.ones(n, dtype=torch.float),
        "token_resolved_mask": field("resolved_mask", torch.float),
        "token_disto_mask": field("disto_mask", torch.float),
        "contact_conditioning_ops": ops,
        "contact_conditioning_op_threshold": op_threshold,
        "contact_conditioning_unspecified": unspecified,
        "method_feature": torch.full((n,), method_id, dtype=torch.long),
        "modified": field("modified", torch.long),
        "cyclic_period": cyclic_period,
        "affinity_token_mask": field("affinity_mask", torch.float),
    }


def _cyclic_lengths(data) -> torch.Tensor:
    """Per token, the residue count of its chain if a bond closes that chain head-to-tail."""
    chains = data.structure.chains
    closed = {}
    for bond in data.structure.bonds:
        c = int(bond["chain_1"])
        if c != bond["chain_2"] or not 0 <= c < len(chains) or bond["res_1"] == bond["res_2"]:
            continue
        res_num = int(chains[c]["res_num"])
        head_tail = {int(bond["res_1"]), int(bond["res_2"])} == {0, res_num - 1}
        if res_num > 2 and head_tail:
            closed[int(chains[c]["asym_id"])] = res_num
    lengths = [closed.get(int(a), 0) for a in data.tokens["asym_id"]]
    return torch.tensor(lengths, dtype=torch.float)


def _token_bonds(data) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2] directed bonded token pairs (row-major) and [E] their type, last bond winning."""
    position = {int(t): i for i, t in enumerate(data.tokens["token_idx"])}
    pair_type: dict[tuple[int, int], int] = {}
    for bond in data.bonds:
        i, j, kind = position[int(bond["token_1"])], position[int(bond["token_2"])], int(bond["type"])
        pair_type[(i, j)] = kind
        pair_type[(j, i)] = kind
    pairs = sorted(pair_type)
    index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    kinds = torch.tensor([pair_type[p] for p in pairs], dtype=torch.long)
    return index, kinds


def _token_keys(data) -> list[tuple[int, int]]:
    """How constraints name a token: (asym, residue) for polymers, (asym, first atom) for ligands."""
    from boltz.data import const

    tokens = data.tokens
    nonpolymer = tokens["mol_type"] == const.chain_type_ids["NONPOLYMER"]
    second = np.where(nonpolymer, tokens["atom_idx"], tokens["res_idx"])
    return list(zip(tokens["asym_id"].tolist(), second.tolist()))


def _contact_ops(data, pocket, contact) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's inference-time contact-conditioning writes, in its order, as compact ops."""
    from boltz.data import const

    info = const.contact_conditioning_info
    ops, thresholds = [], []
    keys = _token_keys(data) if (pocket or contact) else []
    for binder, contacts, max_distance, _force in pocket or []:
        for idx, key in enumerate(keys):
            if key in contacts:
                ops.append((SET_CHAIN, int(binder), idx, info["BINDER>POCKET"], info["POCKET>BINDER"]))
                thresholds.append(max_distance)
    for token1, token2, max_distance, _force in contact or []:
        # upstream writes only the first token matching token1 with the first matching token2
        idx1 = next((i for i, key in enumerate(keys) if key == token1), None)
        idx2 = next((i for i, key in enumerate(keys) if key == token2), None) if idx1 is not None else None
        if idx2 is not None:
            ops.append((SET_TOKEN, idx1, idx2, info["CONTACT"], info["CONTACT"]))
            thresholds.append(max_distance)
    asym = data.tokens["asym_id"]
    took_effect = any(kind == SET_TOKEN or bool((asym == value).any()) for kind, value, *_ in ops)
    return (
        torch.tensor(ops, dtype=torch.long).reshape(-1, 5),
        torch.tensor(thresholds, dtype=torch.float64).float(),  # upstream: f64 array, then f32
        torch.tensor(not took_effect),
    )


# --------------------------------------------------------------------------------------------
# atom features (upstream: process_atom_features)


class _RefTable:
    """Per (residue name, conformer): element, charge, chirality and position of each named atom."""

    def __init__(self, molecules):
        from boltz.data import const

        self.molecules = molecules
        self.unk = const.chirality_type_ids[const.unk_chirality_type]
        self.chirality_ids = const.chirality_type_ids
        self.names: dict[str, dict] = {}
        self.conf_ids: dict[str, list[int]] = {}
        self.offset: dict[tuple[str, int], int] = {}
        self.rows: list[tuple] = []

    def atom_names(self, res_name: str) -> dict:
        if res_name not in self.names:
            mol = self.molecules[res_name]
            self.names[res_name] = {a.GetProp("name"): a.GetIdx() for a in mol.GetAtoms()}
            self.conf_ids[res_name] = [int(c.GetId()) for c in mol.GetConformers()]
        return self.names[res_name]

    def block(self, res_name: str, conf_id: int) -> int:
        key = (res_name, conf_id)
        if key not in self.offset:
            mol = self.molecules[res_name]
            xyz = mol.GetConformer(conf_id).GetPositions()
            self.offset[key] = len(self.rows)
            for a in mol.GetAtoms():
                chir = self.chirality_ids.get(a.GetChiralTag().name, self.unk)
                self.rows.append((a.GetAtomicNum(), a.GetFormalCharge(), chir, *xyz[a.GetIdx()]))
        return self.offset[key]

    def arrays(self, rows: np.ndarray):
        table = np.array(self.rows, dtype=np.float64).reshape(-1, 6)[rows]
        ints = table[:, :3].astype(np.int64)
        return ints[:, 0], ints[:, 1], ints[:, 2], table[:, 3:]


def _atom_features(data, random, ensemble, molecules) -> dict:
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import compute_frames_nonpolymer, convert_atom_name
    from boltz.model.modules.utils import center_random_augmentation

    structure, tokens = data.structure, data.tokens
    n = len(tokens)
    starts = tokens["atom_idx"].astype(np.int64)
    nums = tokens["atom_num"].astype(np.int64)
    first = np.cumsum(nums) - nums  # each token's first row in the featurized atom table
    m = int(nums.sum())
    atom_to_token = np.repeat(np.arange(n), nums)
    source = np.repeat(starts - first, nums) + np.arange(m)  # structure atom of each row
    atoms = structure.atoms[source]
    chain_type = structure.chains["mol_type"][tokens["asym_id"]].astype(np.int64)
    names = atoms["name"]

    # residue uid, conformer choice (same draws from `random`, same order) and reference rows
    table = _RefTable(molecules)
    uid_of, conf_of = {}, {}
    token_uid = np.empty(n, dtype=np.int64)
    ref_rows = np.empty(m, dtype=np.int64)
    res_names = tokens["res_name"]
    for t, key in enumerate(zip(tokens["asym_id"].tolist(), tokens["res_idx"].tolist())):
        res_name = res_names[t]
        name_to_idx = table.atom_names(res_name)
        token_uid[t] = uid_of.setdefault(key, len(uid_of))
        if key not in conf_of:
            conf_of[key] = int(random.choice(table.conf_ids[res_name]))
        base = table.block(res_name, conf_of[key])
        lo, hi = first[t], first[t] + nums[t]
        ref_rows[lo:hi] = [base + name_to_idx[a] for a in names[lo:hi]]
    element, charge, chirality, conformer = table.arrays(ref_rows)
    ref_space_uid = token_uid[atom_to_token]

    unique_names, name_inv = np.unique(names, return_inverse=True)
    name_chars = np.array([convert_atom_name(a) for a in unique_names], dtype=np.int64).reshape(-1, 4)[name_inv]
    backbone = _backbone_index(unique_names, name_inv, chain_type[atom_to_token])

    # coordinates of the sampled ensemble members, and the distogram coordinates of all
    ref_idxs = [int(i) for i in ensemble["ensemble_ref_idxs"]]
    coords_all = structure.coords["coords"]
    e_offsets = structure.ensemble["atom_coord_idx"].astype(np.int64)
    coord_data = np.stack([coords_all[int(structure.ensemble[i]["atom_coord_idx"]) + source] for i in ref_idxs])
    disto_coords = coords_all[e_offsets[None, :] + tokens["disto_idx"].astype(np.int64)[:, None]]
    disto_coords_ensemble = torch.from_numpy(disto_coords)[:, ensemble["ensemble_ref_idxs"]].permute(1, 0, 2)

    is_present = atoms["is_present"].copy()
    frame_data, frame_mask = _polymer_frames(tokens, first, names, is_present)
    frames, frames_resolved = [], []
    for i in range(coord_data.shape[0]):
        f, r = compute_frames_nonpolymer(data, coord_data[i], is_present, atom_to_token, frame_data, frame_mask)
        frames.append(f.copy())
        frames_resolved.append(r.copy())

    # centering and per-residue rotation: the same tensor ops as upstream, so the same bits
    resolved = torch.from_numpy(is_present)
    coords = torch.from_numpy(coord_data.copy())
    center = (coords * resolved[None, :, None]).sum(dim=1)
    center = center / resolved.sum().clamp(min=1)
    coords = coords - center[:, None]
    ref_pos = torch.from_numpy(conformer).float()
    order = np.argsort(ref_space_uid, kind="stable")
    bounds = np.searchsorted(ref_space_uid[order], np.arange(int(ref_space_uid.max(initial=0)) + 2))
    for i in range(int(ref_space_uid.max(initial=0))):  # NOTE(parity): upstream skips the last uid
        idx = torch.from_numpy(order[bounds[i] : bounds[i + 1]])
        if len(idx) > 0 and torch.any(resolved[idx]):
            ref_pos[idx] = center_random_augmentation(ref_pos[idx][None], resolved[idx][None], centering=True)[0]

    m_pad = ((m - 1) // ATOMS_PER_WINDOW + 1) * ATOMS_PER_WINDOW if m > 0 else 0

    def padded(values, dim=0, fill=0):
        shape = list(values.shape)
        shape[dim] = m_pad
        out = torch.full(shape, fill, dtype=values.dtype)
        out.narrow(dim, 0, m).copy_(values)
        return out

    center_atom = first + tokens["center_idx"] - starts
    polymer_resolved = (chain_type != const.chain_type_ids["NONPOLYMER"]) & tokens["resolved_mask"]
    num_backbone = 1 + len(const.protein_backbone_atom_index) + len(const.nucleic_backbone_atom_index)
    return {
        "ref_pos": padded(ref_pos),
        "atom_resolved_mask": padded(resolved),
        "ref_atom_name_chars": _padded_one_hot(torch.from_numpy(name_chars), 64, m_pad),
        "ref_element": _padded_one_hot(torch.from_numpy(element), const.num_elements, m_pad),
        "ref_charge": padded(torch.from_numpy(charge).float()),
        "ref_chirality": padded(torch.from_numpy(chirality)),
        "atom_backbone_feat": _padded_one_hot(torch.from_numpy(backbone), num_backbone, m_pad),
        "ref_space_uid": padded(torch.from_numpy(ref_space_uid)),
        "coords": padded(coords, dim=1),
        "atom_pad_mask": padded(torch.ones(m, dtype=torch.float)),
        "atom_to_token_index": padded(torch.from_numpy(atom_to_token), fill=-1),
        "token_to_rep_atom_index": torch.from_numpy(first + tokens["disto_idx"] - starts),
        "r_set_to_rep_atom_index": torch.from_numpy(center_atom[polymer_resolved]),
        "token_to_center_atom_index": torch.from_numpy(center_atom),
        "disto_coords_ensemble": disto_coords_ensemble,
        "bfactor": padded(torch.from_numpy(atoms["bfactor"].copy())),
        "plddt": padded(torch.from_numpy(atoms["plddt"].copy())),
        "frames_idx": torch.from_numpy(np.stack(frames)),
        "frame_resolved_mask": torch.from_numpy(np.stack(frames_resolved)),
    }


def _padded_one_hot(index: torch.Tensor, num_classes: int, rows: int) -> torch.Tensor:
    """one_hot(index) zero-padded to `rows` along dim 0, without a second full-size copy."""
    if index.numel() and (index.min() < 0 or index.max() >= num_classes):
        one_hot(index, num_classes=num_classes)  # raises upstream's own error
    out = torch.zeros((rows, *index.shape[1:], num_classes), dtype=torch.long)
    out[: index.shape[0]].scatter_(-1, index.unsqueeze(-1), 1)
    return out


def _backbone_index(unique_names, name_inv, atom_chain_type) -> np.ndarray:
    """Upstream's backbone atom class: 0 = none, 1.. protein backbone, then nucleic backbone."""
    from boltz.data import const

    protein = const.protein_backbone_atom_index
    nucleic = const.nucleic_backbone_atom_index
    prot = np.array([protein[a] + 1 if a in protein else 0 for a in unique_names], dtype=np.int64)
    nucl = np.array([nucleic[a] + 1 + len(protein) if a in nucleic else 0 for a in unique_names], dtype=np.int64)
    ids = const.chain_type_ids
    is_nucleic = (atom_chain_type == ids["DNA"]) | (atom_chain_type == ids["RNA"])
    out = np.zeros(len(name_inv), dtype=np.int64)
    out[atom_chain_type == ids["PROTEIN"]] = prot[name_inv][atom_chain_type == ids["PROTEIN"]]
    out[is_nucleic] = nucl[name_inv][is_nucleic]
    return out


def _polymer_frames(tokens, first, names, is_present) -> tuple[np.ndarray, np.ndarray]:
    """Frame atoms (a, b, c) and their presence per token; non-polymers are filled in later."""
    from boltz.data import const

    ids = const.chain_type_ids
    frames = np.zeros((len(tokens), 3), dtype=np.int64)
    mask = np.zeros(len(tokens), dtype=bool)
    for t in range(len(tokens)):
        num, off = int(tokens["atom_num"][t]), int(first[t])
        mol_type, res_name = tokens["mol_type"][t], str(tokens["res_name"][t])
        tok_names, present = names[off : off + num], is_present[off : off + num]
        nucleic = mol_type in (ids["DNA"], ids["RNA"])
        if num < 3 or const.tokens[tokens["res_type"][t]] in ("PAD", "UNK", "-"):
            abc, ok = (0, 0, 0), False
        elif mol_type == ids["PROTEIN"] or nucleic:
            want = ("N", "CA", "C") if mol_type == ids["PROTEIN"] else ("C1'", "C3'", "C4'")
            if res_name in const.ref_atoms:
                abc = tuple(const.ref_atoms[res_name].index(a) for a in want)
                ok = bool(present[abc[0]] and present[abc[1]] and present[abc[2]])
            else:  # modified residue: find the atoms by name (upstream puts CA first here)
                if mol_type == ids["PROTEIN"]:
                    want = ("CA", "N", "C")
                found = [(int((tok_names == a).argmax()), bool((tok_names == a).any())) for a in want]
                abc = tuple(i for i, _ in found)
                ok = all(has and present[i] for i, has in found)
        else:
            abc, ok = (0, 0, 0), False
        frames[t] = np.asarray(abc) + off
        mask[t] = ok
    return frames, mask
