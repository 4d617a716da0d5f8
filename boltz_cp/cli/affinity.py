"""The affinity pass of `boltz_cp predict` (upstream: "Predicting property: affinity").

For an input whose YAML asks for `properties: - affinity: {binder: L}`, upstream's
`boltz predict` runs a second pass after the structure: the affinity checkpoint
(`boltz2_aff.ckpt`, a whole Boltz-2 with affinity heads) predicts on the top-ranked structure
cropped around the binder (boltz_cp/data/affinity.py) with fixed predict arguments (recycling 5,
`sampling_steps_affinity`, `diffusion_samples_affinity`, one sample at a time, no steering,
`affinity_mw_correction`), and its `BoltzAffinityWriter` writes `affinity_<id>.json` next to the
structures. Here the same happens per input, right after its structure pass, inside the input's
staging folder, so the json is published together with the structures or not at all.

Both backends: `reference` runs upstream's serial Boltz2 (1x1); `cp` runs Boltz2CP on the mesh
(trunk, diffusion, confidence on the tiles; the affinity heads on the writer rank, see
boltz_cp/modules/affinity.py). Only the writer rank writes the structures, so the other ranks
receive the pre-affinity structure from it (one broadcast) before they featurize the crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from boltz_cp.errors import BoltzCPError, InputError

# Upstream's predict_affinity_args (boltz/main.py): fixed, except the steps and samples.
AFFINITY_RECYCLING_STEPS = 5
AFFINITY_MAX_PARALLEL_SAMPLES = 1
AFFINITY_STEERING = {"fk_steering": False, "physical_guidance_update": False, "contact_guidance_update": False}


def affinity_checkpoint_path(cfg, cache: Path) -> Path:
    from boltz_cp.models.checkpoint import default_affinity_checkpoint_path

    return Path(cfg.affinity_checkpoint).expanduser() if cfg.affinity_checkpoint \
        else default_affinity_checkpoint_path(cache)


def load_affinity_model(cfg, path: Path):
    """The affinity model from its checkpoint's own hparams (our loader, strict), on the CPU until
    a pass needs it; `Boltz2CP` for model.backend=cp. Returns (model, info)."""
    from boltz_cp.models.checkpoint import load_boltz2

    model, info = load_boltz2(
        path,
        predict_args={
            "recycling_steps": AFFINITY_RECYCLING_STEPS,
            "sampling_steps": cfg.sampling_steps_affinity,
            "diffusion_samples": cfg.diffusion_samples_affinity,
            "max_parallel_samples": AFFINITY_MAX_PARALLEL_SAMPLES,
            "write_confidence_summary": False,
            "write_full_pae": False,
            "write_full_pde": False,
        },
        diffusion_overrides={"step_scale": cfg.step_scale},
        steering_args=AFFINITY_STEERING,
        msa_overrides={"subsample_msa": cfg.subsample_msa, "num_subsampled_msa": cfg.num_subsampled_msa},
        use_kernels=False,
        cp=cfg.model.backend == "cp",
        affinity_mw_correction=cfg.affinity_mw_correction,
    )
    if not getattr(model, "affinity_prediction", False):
        from boltz_cp.errors import CheckpointError

        raise CheckpointError(f"{path} is not a Boltz-2 affinity checkpoint (its hyper_parameters have "
                              "affinity_prediction false); affinity_checkpoint must name boltz2_aff.ckpt")
    return model, info


def write_and_share(write: Callable[[], None], path: Path, mesh, device: torch.device) -> None:
    """The writer rank runs `write` (which writes the file `path` among its outputs); every other
    rank then holds a copy of that file at its own `path` (one broadcast_object_list).

    Every rank takes part in the broadcast whatever happens: if the writer fails, it sends the
    error instead, and every rank raises (an InputError as an InputError, so that every rank goes
    on to the next input together).
    """
    payload: tuple[str, bytes | str] | None = None
    failure: Exception | None = None
    if mesh.is_writer:
        try:
            write()
            payload = ("ok", path.read_bytes() if mesh.size > 1 else b"")
        except Exception as e:  # noqa: BLE001 -- reported to every rank, then raised here
            if mesh.size == 1:
                raise
            kind = "input_error" if isinstance(e, InputError) else "error"
            failure, payload = e, (kind, f"{type(e).__name__}: {e}")
    if mesh.size > 1:
        box = [payload]
        dist.broadcast_object_list(box, src=mesh.writer, group=mesh.group,
                                   device=device if device.type == "cuda" else None)
        payload = box[0]
    if failure is not None:
        raise failure
    kind, body = payload
    if kind != "ok":
        error = InputError if kind == "input_error" else BoltzCPError
        raise error(f"the writer rank could not write the structure for the affinity pass: {body}")
    if not mesh.is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def predict_affinity(cfg, model, record, dirs, staged: Path, mol_dir: Path, device: torch.device,
                     precision: str, log, mesh) -> None:
    """The affinity pass of one record (every rank): featurize the crop of
    ``staged/<id>/pre_affinity_<id>.npz``, run the affinity model, and write
    ``staged/<id>/affinity_<id>.json`` on the writer rank with upstream's BoltzAffinityWriter."""
    from boltz.data.write.writer import BoltzAffinityWriter

    from boltz_cp.cli.run import run_model
    from boltz_cp.data.affinity import featurize_affinity

    cp = cfg.model.backend == "cp"
    batch = featurize_affinity(record, dirs, staged, mol_dir, seed=cfg.seed, lean=cp)
    n_tokens = int(batch["token_pad_mask"].sum())
    log(f"{record.id}: affinity: {n_tokens} tokens cropped around the binder, "
        f"{int(batch['atom_pad_mask'].sum())} atoms")
    model.to(device)
    try:
        pred = run_model(model, batch, cfg, mesh, device, precision, log)
    finally:
        model.to("cpu")  # the affinity model holds device memory only during its pass
    if pred is not None and pred.get("exception"):
        raise BoltzCPError(f"{record.id}: out of memory on {device} in the affinity pass at {n_tokens} tokens")
    if mesh.is_writer:
        BoltzAffinityWriter(data_dir=str(dirs.structures), output_dir=str(staged)).write_on_batch_end(
            None, None, pred, None, batch, 0, 0)
