"""The reference backend reproduces upstream Boltz-2 run in-process. Tier: no process group.

Upstream side: `boltz.main.process_inputs` + upstream's `PredictionDataset` for featurization,
`Boltz2.load_from_checkpoint` for the model, `predict_step` in fp32 with no autocast.
Our side: `boltz_cp.data.inputs` + `boltz_cp.models.checkpoint.load_boltz2` + `run_reference`.
Same checkpoint, same input file, same seed: features and coordinates must be equal.
"""

from __future__ import annotations

import torch

SEED = 7
PREDICT = {
    "recycling_steps": 1,
    "sampling_steps": 3,
    "diffusion_samples": 2,
    "max_parallel_samples": None,
    "write_confidence_summary": True,
    "write_full_pae": True,
    "write_full_pde": True,
}


def _upstream(inp, tmp_path, mol_dir, ckpt):
    from dataclasses import asdict

    from boltz.data.module.inferencev2 import PredictionDataset, collate
    from boltz.data.types import Manifest
    from boltz.main import Boltz2DiffusionParams, BoltzSteeringParams, process_inputs
    from boltz.model.models.boltz2 import Boltz2
    from lightning_fabric.utilities.seed import seed_everything

    from boltz_cp.data.inputs import seeded_conformers

    out = tmp_path / "upstream"
    # Upstream's SMILES conformers are unseeded (random per run); seed them the way we do.
    with seeded_conformers(SEED):
        process_inputs(data=[inp], out_dir=out, ccd_path=mol_dir.parent / "ccd.pkl", mol_dir=mol_dir,
                       msa_server_url="", msa_pairing_strategy="greedy", boltz2=True)
    proc = out / "processed"
    ds = PredictionDataset(
        manifest=Manifest.load(proc / "manifest.json"), target_dir=proc / "structures", msa_dir=proc / "msa",
        mol_dir=mol_dir, constraints_dir=proc / "constraints", template_dir=proc / "templates",
        extra_mols_dir=proc / "mols",
    )
    torch.manual_seed(SEED)
    batch = collate([ds[0]])
    hp = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    steering = asdict(BoltzSteeringParams())
    steering.update(fk_steering=False, physical_guidance_update=False)
    model = Boltz2.load_from_checkpoint(
        ckpt, strict=True, map_location="cpu", predict_args=PREDICT,
        diffusion_process_args=asdict(Boltz2DiffusionParams()), ema=False, use_kernels=False,
        msa_args={**hp["msa_args"], "subsample_msa": True, "num_subsampled_msa": 1024},
        steering_args=steering,
    ).eval()
    seed_everything(SEED, verbose=False)
    with torch.inference_mode():
        pred = model.predict_step(batch, 0)
    return batch, pred


def _ours(inp, tmp_path, mol_dir, ckpt):
    from boltz_cp.cli.run import run_reference
    from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, write_processed
    from boltz_cp.models.checkpoint import load_boltz2

    dirs = ProcessedDirs(tmp_path / "ours").make()
    record = write_processed(parse_target(inp, mol_dir, SEED), inp, dirs)
    batch = featurize(record, dirs, mol_dir, seed=SEED)
    model, _ = load_boltz2(
        ckpt, predict_args=PREDICT, diffusion_overrides={"step_scale": 1.5},
        steering_args={"fk_steering": False, "physical_guidance_update": False},
        msa_overrides={"subsample_msa": True, "num_subsampled_msa": 1024},
    )
    return batch, run_reference(model, batch, SEED, torch.device("cpu"), "fp32")


def test_reference_equals_upstream(small_input, tmp_path, boltz_cache, tiny_ckpt):
    mol_dir = boltz_cache / "mols"
    up_batch, up = _upstream(small_input, tmp_path, mol_dir, tiny_ckpt)
    our_batch, ours = _ours(small_input, tmp_path, mol_dir, tiny_ckpt)
    tensor_keys = [k for k, v in up_batch.items() if isinstance(v, torch.Tensor)]
    assert len(tensor_keys) > 30
    for k in tensor_keys:
        torch.testing.assert_close(our_batch[k], up_batch[k], rtol=0, atol=0, msg=k)
    assert ours["coords"].dtype == torch.float32
    assert ours["coords"].abs().max() > 0
    torch.testing.assert_close(ours["coords"], up["coords"], rtol=0, atol=0)
    for k in ("plddt", "pde", "complex_plddt", "confidence_score"):
        torch.testing.assert_close(ours[k], up[k], rtol=0, atol=0, msg=k)
    # the seed matters: another seed moves the coordinates
    from boltz_cp.cli.run import run_reference
    from boltz_cp.models.checkpoint import load_boltz2

    model, _ = load_boltz2(tiny_ckpt, predict_args=PREDICT,
                           steering_args={"fk_steering": False, "physical_guidance_update": False})
    other = run_reference(model, our_batch, SEED + 1, torch.device("cpu"), "fp32")
    assert not torch.allclose(other["coords"], ours["coords"])
