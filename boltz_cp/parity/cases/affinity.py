"""Parity case `model_affinity`: upstream `Boltz2.forward` of an affinity model (the
`tiny-affinity` checkpoint preset: trunk, diffusion, confidence and an ensemble of two affinity
heads, molecular-weight correction on) vs `Boltz2CP` with the affinity heads on rank 0, same
random weights and seed, on a real affinity-pass input.

The input: a protein with an MSA (so the affinity profile, the query row alone, differs from the
trunk's), a second protein and a SMILES binder; its "predicted" structure (residues spread along
a helix, written by upstream's own BoltzWriter as `pre_affinity_<id>.npz`) is cropped and
featurized as upstream's affinity pass does (`featurize_affinity`: upstream's dense featurizer
for upstream, the lean one for CP). Compared: the six affinity outputs, the sampled coordinates
and ipTM (which picks the sample the heads see). Settings: 1 recycle, 5 steps, 2 samples,
steering off. `--tokens` does not apply.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from boltz_cp.parity.reference import fp64_reference
from boltz_cp.parity.runner import register

RECYCLING_STEPS, SAMPLING_STEPS, SAMPLES, SEED = 1, 10, 2, 3
_A, _B = "MKTAYIAKQRQISFVK", "GSHMSLFD"
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
      msa: empty
  - ligand:
      id: L
      smiles: 'CC(=O)Nc1ccc(O)cc1'
properties:
  - affinity:
      binder: L
"""
OUTPUTS = ("affinity_pred_value", "affinity_probability_binary", "affinity_pred_value1",
           "affinity_probability_binary1", "affinity_pred_value2", "affinity_probability_binary2",
           "sample_atom_coords", "iptm")
_CACHE: dict = {}


def affinity_features() -> dict[str, dict]:
    """{"dense": upstream's features, "lean": featurize_lean's} of the case's affinity input
    (tensors; floating ones in float64, affinity_mw as a float64 [1] tensor); built once per
    machine and source version in a child process, as the trunk case does."""
    if "feats" not in _CACHE:
        path = _cache_path()
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                subprocess.run([sys.executable, "-c", f"from {__name__} import _featurize_to; "
                                f"_featurize_to({str(path)!r})"], check=True, capture_output=True)
        _CACHE["feats"] = torch.load(path)
    return _CACHE["feats"]


def _cache_path() -> Path:
    import boltz

    import boltz_cp.data as data

    digest = hashlib.sha256(boltz.__version__.encode() if hasattr(boltz, "__version__") else b"")
    for src in sorted([Path(__file__), *Path(data.__file__).parent.glob("*.py")]):
        digest.update(src.read_bytes())
    return Path(tempfile.gettempdir()) / f"boltz_cp_affinity_case_{digest.hexdigest()[:16]}.pt"


def _tensors(batch: dict) -> dict:
    out = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["affinity_mw"] = torch.tensor([float(batch["affinity_mw"][0])], dtype=torch.float64)
    return out


def _featurize_to(out: str) -> None:
    from boltz.data.write.writer import BoltzWriter

    from boltz_cp.data.affinity import featurize_affinity
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, write_processed

    with tempfile.TemporaryDirectory(prefix="boltz_cp_affinity_case_") as tmp:
        folder = Path(tmp)
        mol_dir = folder / "mols"
        ensure_molecules(mol_dir, [])
        (folder / "A.a3m").write_text(f">q\n{_A}\n>h1\nMKTAYLAKQRQISFVR\n>h2\nMRTAYIAK-RQLSFVK\n")
        path = folder / "complex.yaml"
        path.write_text(_YAML.format(a=_A, b=_B, msa_a=folder / "A.a3m"))
        dirs = ProcessedDirs(folder / "processed").make()
        record = write_processed(parse_target(path, mol_dir, SEED), path, dirs)
        # A "predicted" structure: token i around a helix point, atoms scattered around it.
        structure = featurize(record, dirs, mol_dir, seed=SEED)
        token = structure["atom_to_token"][0].argmax(-1).numpy()
        rng = np.random.default_rng(0)
        centre = np.stack([9.0 * np.cos(1.2 * token), 9.0 * np.sin(1.2 * token), 1.5 * token], axis=-1)
        xyz = torch.from_numpy(centre + rng.normal(scale=1.2, size=centre.shape)).float()[None]
        predictions = folder / "predictions"
        writer = BoltzWriter(data_dir=str(dirs.structures), output_dir=str(predictions), boltz2=True)
        writer.write_on_batch_end(None, None, {"exception": False, "coords": xyz, "masks": structure["atom_pad_mask"]},
                                  None, structure, 0, 0)
        feats = {"dense": _tensors(featurize_affinity(record, dirs, predictions, mol_dir, SEED)),
                 "lean": _tensors(featurize_affinity(record, dirs, predictions, mol_dir, SEED, lean=True))}
    tmp_out = Path(f"{out}.tmp{os.getpid()}")
    torch.save(feats, tmp_out)
    os.replace(tmp_out, out)  # readers never see a partial file


@register("model_affinity")
class ModelAffinityCase:
    checkpoint_preset = "tiny-affinity"  # the runner's layer widths do not apply

    def build(self, preset):
        from boltz_cp.models.checkpoint import _upstream_steering_defaults, build_model
        from boltz_cp.models.presets import PRESETS

        model = build_model(PRESETS["tiny-affinity"])
        model.predict_args = {"recycling_steps": RECYCLING_STEPS, "sampling_steps": SAMPLING_STEPS,
                              "diffusion_samples": SAMPLES, "max_parallel_samples": None}
        model.steering_args = {**_upstream_steering_defaults(), "fk_steering": False,
                               "physical_guidance_update": False, "contact_guidance_update": False}
        return model

    def cp_twin(self, upstream):
        from boltz_cp.models.boltz2 import Boltz2CP

        return Boltz2CP.from_upstream(upstream)

    def inputs(self, n, preset, generator):
        feats = affinity_features()
        # upstream reads the dense features; the CP model only the lean ones (prefixed "lean.")
        return {**feats["dense"], **{f"lean.{k}": v for k, v in feats["lean"].items()}}

    def num_tokens(self, inputs) -> int:
        return inputs["token_pad_mask"].shape[1]

    def serial(self, module, x):
        feats = {k: v for k, v in x.items() if not k.startswith("lean.")}
        feats["affinity_mw"] = [feats["affinity_mw"][0]]
        torch.manual_seed(SEED)
        out = module(feats, recycling_steps=RECYCLING_STEPS, num_sampling_steps=SAMPLING_STEPS,
                     diffusion_samples=SAMPLES, run_confidence_sequentially=True)
        return {k: out[k] for k in OUTPUTS}

    def cp(self, module, x, layout):
        from boltz_cp.models.boltz2 import ModelInputs, gather_outputs
        from boltz_cp.modules.affinity import AffinityInputs

        lean = {k[len("lean."):]: v for k, v in x.items() if k.startswith("lean.")}
        lean["affinity_mw"] = [lean["affinity_mw"][0]]
        inputs, affinity = ModelInputs.cut(lean, layout), AffinityInputs.cut(lean, layout)
        float64 = next(module.parameters()).dtype == torch.float64
        with fp64_reference() if float64 else nullcontext():
            torch.manual_seed(SEED)
            out = module(inputs, layout, recycling_steps=RECYCLING_STEPS, num_sampling_steps=SAMPLING_STEPS,
                         diffusion_samples=SAMPLES, affinity=affinity)
        full = gather_outputs(out, layout, dst=None)
        return {k: full[k] for k in OUTPUTS}
