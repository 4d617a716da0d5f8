"""Parity case `trunk`: the whole Boltz-2 trunk (s, z, distogram and s_inputs after recycling)
of upstream `Boltz2` vs `Boltz2Trunk`, same random weights (the `tiny` checkpoint preset, whatever
the runner's preset), on one real featurized input.

The input (written to a private temp folder, featurized offline with the residue library built
from biotite's CCD; upstream reads upstream's featurizer output, the CP trunk the compact output
of `featurize_lean`, with none of the dense N x N / M x N features): two protein chains with MSA files, a DNA chain, a CCD ligand, a template
for chain A (an mmCIF written by upstream's own writer from chain A's parsed structure, with
residues spread along a helix so template distances span many bins) and a pocket constraint
binding the ligand to chain A. `--tokens` does not apply: N is the input's token count.
Recycling steps: 1 (so the recycling projections run).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from boltz_cp.parity.runner import register

RECYCLING_STEPS = 1
SEED = 0
_A, _B = "MKTAYIAKQRQG", "GSHMSLFD"
_YAML = """\
version: 1
sequences:
  - protein:
      id: A
      sequence: {a}
      msa: {msa_a}
  - protein:
      id: B
      sequence: {b}
      msa: {msa_b}
  - dna:
      id: C
      sequence: ATGC
  - ligand:
      id: D
      ccd: EDO
templates:
  - cif: {template}
    chain_id: A{template_force}
constraints:
  - pocket:
      binder: D
      contacts: [[A, 3], [A, 7]]
      max_distance: 8.0{pocket_force}
"""
# The `forced` variant: the template and the pocket steer the diffusion (contact guidance), and a
# forced contact between the chains adds a second contact potential term.
_FORCED = {"template_force": "\n    force: true\n    threshold: 2.0", "pocket_force": "\n      force: true",
           "contact": "  - contact:\n      token1: [A, 1]\n      token2: [B, 5]\n      max_distance: 6.0\n"
                      "      force: true\n"}
_UNFORCED = {"template_force": "", "pocket_force": "", "contact": ""}
_CACHE: dict = {}


def _write_template(folder: Path, mol_dir: Path) -> Path:
    """An mmCIF of chain A: its parsed structure with residue i spread around a helix."""
    from boltz.data.write.mmcif import to_mmcif

    from boltz_cp.data.inputs import parse_target

    yaml = folder / "template_src.yaml"
    yaml.write_text(f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {_A}\n      msa: empty\n")
    st = parse_target(yaml, mol_dir, SEED).structure
    rng = np.random.default_rng(0)
    atoms = st.atoms.copy()
    for i, res in enumerate(st.residues):
        a, n = int(res["atom_idx"]), int(res["atom_num"])
        centre = np.array([8.0 * np.cos(1.7 * i), 8.0 * np.sin(1.7 * i), 3.0 * i])
        atoms["coords"][a:a + n] = centre + rng.normal(scale=1.0, size=(n, 3))
        atoms["is_present"][a:a + n] = True
    path = folder / "tplA.cif"
    path.write_text(to_mmcif(replace(st, atoms=atoms), boltz2=True))
    return path


def featurized_input(forced: bool = False) -> dict[str, torch.Tensor]:
    """The case's featurized batch (tensors only, floating ones in float64); built once per process.
    `forced`: the variant whose template, pocket and an extra contact are forced (steering).

    Featurizing loads the CCD and RDKit and leaves ~1 GB resident, which every rank of every
    worker pool would keep: it runs in a child process instead, once per machine and source
    version (a file lock serialises concurrent ranks), and the ranks load the saved tensors.
    """
    name = "forced" if forced else "feats"
    if name not in _CACHE:
        path = _cache_path(name)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                subprocess.run([sys.executable, "-c", f"from {__name__} import _featurize_to; "
                                f"_featurize_to({str(path)!r}, {forced})"], check=True, capture_output=True)
        _CACHE[name] = torch.load(path)
    return _CACHE[name]


def _cache_path(name: str) -> Path:
    """Keyed by this case's and the data path's sources, so a featurizer change never reads stale features."""
    import boltz

    import boltz_cp.data as data

    digest = hashlib.sha256(boltz.__version__.encode() if hasattr(boltz, "__version__") else b"")
    for src in sorted([Path(__file__), *Path(data.__file__).parent.glob("*.py")]):
        digest.update(src.read_bytes())
    return Path(tempfile.gettempdir()) / f"boltz_cp_trunk_case_{name}_{digest.hexdigest()[:16]}.pt"


def _featurize_to(out: str, forced: bool = False) -> None:
    """Featurize the case's input (upstream's featurizer plus featurize_lean's compact keys) into out."""
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.compact import COMPACT_KEYS
    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, write_processed

    with tempfile.TemporaryDirectory(prefix="boltz_cp_trunk_case_") as tmp:
        folder = Path(tmp)
        mol_dir = folder / "mols"
        ensure_molecules(mol_dir, ["EDO"])
        (folder / "A.a3m").write_text(f">q\n{_A}\n>h1\nMKTAYLAKQRQG\n>h2\nMRTAYIAK-RQG\n>h3\nMKSAYIAKQRHG\n")
        (folder / "B.a3m").write_text(f">q\n{_B}\n>h1\nGSHMSIFD\n>h2\nGAHMSLFE\n")
        path = folder / "complex.yaml"
        variant = _FORCED if forced else _UNFORCED
        path.write_text(_YAML.format(a=_A, b=_B, msa_a=folder / "A.a3m", msa_b=folder / "B.a3m",
                                     template=_write_template(folder, mol_dir), **variant) + variant["contact"])
        dirs = ProcessedDirs(folder / "processed").make()
        record = write_processed(parse_target(path, mol_dir, SEED), path, dirs)
        batch = featurize(record, dirs, mol_dir, seed=SEED)
        lean = featurize_lean(record, dirs, mol_dir, seed=SEED)
    batch.update({k: lean[k] for k in COMPACT_KEYS})
    feats = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()
             if isinstance(v, torch.Tensor)}
    tmp_out = Path(f"{out}.tmp{os.getpid()}")
    torch.save(feats, tmp_out)
    os.replace(tmp_out, out)  # readers never see a partial file


@contextmanager
def trunk_only(model):
    """Upstream Boltz2.forward up to the distogram: no structure, confidence or affinity."""
    saved = (model.skip_run_structure, model.confidence_prediction, model.affinity_prediction)
    model.skip_run_structure, model.confidence_prediction, model.affinity_prediction = True, False, False
    try:
        yield model
    finally:
        model.skip_run_structure, model.confidence_prediction, model.affinity_prediction = saved


OUTPUTS = ("s", "z", "pdistogram", "s_inputs")


@register("trunk")
class TrunkCase:
    checkpoint_preset = "tiny"  # the runner's layer widths do not apply

    def build(self, preset):
        from boltz_cp.models.checkpoint import build_model
        from boltz_cp.models.presets import PRESETS

        return build_model(PRESETS["tiny"])

    def cp_twin(self, upstream):
        from boltz_cp.models.trunk import Boltz2Trunk

        return Boltz2Trunk.from_upstream(upstream)

    def inputs(self, n, preset, generator):
        return dict(featurized_input())

    def num_tokens(self, inputs) -> int:
        return inputs["token_pad_mask"].shape[1]

    def serial(self, module, x):
        with trunk_only(module):
            out = module(dict(x), recycling_steps=RECYCLING_STEPS)
        s_inputs = module.input_embedder(dict(x))
        return {"s": out["s"], "z": out["z"], "pdistogram": out["pdistogram"], "s_inputs": s_inputs}

    def cp(self, module, x, layout):
        from boltz_cp.data.compact import DENSE_KEYS
        from boltz_cp.models.trunk import TrunkInputs

        lean = {k: v for k, v in x.items() if k not in DENSE_KEYS}  # no N x N feature reaches CP
        out = module(TrunkInputs.cut(lean, layout), layout, recycling_steps=RECYCLING_STEPS)
        return {
            "s": layout.gather_single(out["s"]),
            "z": layout.gather_pair(out["z"]),
            "pdistogram": layout.gather_pair(out["pdistogram"]),
            "s_inputs": layout.gather_single(out["s_inputs"]),
        }
