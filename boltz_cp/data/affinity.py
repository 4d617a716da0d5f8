"""The affinity pass's input: the predicted structure cropped around the binder, featurized.

Upstream `boltz predict` predicts the affinity property in a second pass: its structure writer
saves the top-ranked model as `predictions/<id>/pre_affinity_<id>.npz`; the affinity dataset
(`Boltz2InferenceDataModule(affinity=True, override_method="other")`) loads that structure,
tokenizes it, crops it around the binder with `AffinityCropper` (at most 256 tokens, 2,048
atoms, 200 polymer tokens), and featurizes the crop with `compute_affinity=True`: the MSA profile
of the query sequence alone (`profile_affinity`, `deletion_mean_affinity`), the binder's
molecular weight (`affinity_mw`) and no templates. `featurize_affinity` does the same through
upstream's own loader, cropper and featurizer (`lean=False`), or through `featurize_lean`'s
compact features (`lean=True`, what the CP backend reads).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from boltz_cp.errors import InputError

# Upstream's affinity pass: PredictionDataset(affinity=True) featurizes with this method (the
# crop's sizes are inputs.py's AFFINITY_MAX_TOKENS / AFFINITY_MAX_ATOMS).
AFFINITY_METHOD = "other"


def pre_affinity_name(record_id: str) -> str:
    """The file upstream's BoltzWriter saves the top model to, for the affinity pass."""
    return f"pre_affinity_{record_id}.npz"


def affinity_binder(path: Path) -> str | None:
    """The chain named by `properties: - affinity: {binder: ...}` of a YAML input, else None
    (FASTA inputs cannot ask for it). Cheap: reads the file only."""
    from boltz_cp.data.inputs import SUFFIXES_YAML, load_yaml

    if path.suffix.lower() not in SUFFIXES_YAML:
        return None
    for prop in load_yaml(path).get("properties", None) or []:
        if isinstance(prop, dict) and "affinity" in prop:
            body = prop["affinity"]
            return str(body.get("binder")) if isinstance(body, dict) else None
    return None


def featurize_affinity(record, dirs, predictions_dir: Path, mol_dir: Path, seed: int, lean: bool = False) -> dict:
    """A batch of one for the affinity pass of `record`, read from
    ``predictions_dir/<id>/pre_affinity_<id>.npz`` (see the module docstring).

    ``lean=False``: upstream's dense features (`Boltz2Featurizer.process(compute_affinity=True)`),
    for the reference backend. ``lean=True``: `featurize_lean`'s keys (compact pair / atom maps)
    plus profile_affinity, deletion_mean_affinity and affinity_mw, every shared key equal to the
    dense run's. Seeded like `inputs.featurize` (torch's global RNG for the ref_pos rotations,
    `default_rng(42)` for the conformers).
    """
    from boltz.data.feature.featurizerv2 import process_msa_features
    from boltz.data.module.inferencev2 import collate

    from boltz_cp.data.features import batch_of_one, lean_features
    from boltz_cp.data.inputs import prepare_tokenized, upstream_features

    if record.affinity is None:
        raise InputError(f"{record.id} does not ask for the affinity property")
    data, molecules, pocket, contact = prepare_tokenized(record, dirs, mol_dir, AFFINITY_METHOD,
                                                         affinity_dir=predictions_dir)
    torch.manual_seed(seed)
    random = np.random.default_rng(42)
    try:
        if lean:
            # compute_affinity: no templates; the query row alone for the profile (no RNG draw).
            features = lean_features(replace(data, templates=None), molecules, random, pocket, contact,
                                      AFFINITY_METHOD)
            features.update(process_msa_features(data=data, random=random, max_seqs_batch=1, max_seqs=1,
                                                 affinity=True))
            features["affinity_mw"] = record.affinity.mw
        else:
            features = upstream_features(data, molecules, random, pocket, contact, AFFINITY_METHOD, affinity=True)
    except Exception as e:  # noqa: BLE001 -- upstream raises bare ValueError/AssertionError/KeyError
        raise InputError(f"cannot featurize {record.id} for affinity: {type(e).__name__}: {e}") from None
    features["record"] = record
    return batch_of_one(features) if lean else collate([features])
