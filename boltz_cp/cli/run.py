"""From a featurized batch to upstream's prediction dict: the step `boltz_cp predict`, its
affinity pass and `boltz_cp.bench` share.

`run_model` picks the backend: `run_reference` (upstream's serial `Boltz2.predict_step`, 1x1) or
`run_cp` (`Boltz2CP` on the mesh). `run_cp` is three steps, which the bench times one by one:
`cut_inputs` (this rank's tiles of the batch), `forward_cp` (seeded like `run_reference`, so the
same seed samples the same noise as the serial model) and `finish_prediction` (the outputs of
`outputs_to_gather` gathered to the mesh's writer rank, then upstream's own post-processing).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# Outputs that stay on the tiles: N x N and read by no writer (the trunk's z only for embeddings).
NOT_GATHERED = ("pdistogram", "relative_position_encoding")


PRECISIONS = ("auto", "fp32", "bf16-mixed")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16-mixed as Lightning does it (autocast, fp32 weights); fp32 runs with no autocast at all."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def outputs_to_gather(out: dict, write_embeddings: bool) -> dict:
    """The forward's outputs the writer needs: all but `NOT_GATHERED`, and z only for embeddings."""
    return {k: v for k, v in out.items() if k not in NOT_GATHERED and (write_embeddings or k != "z")}


def model_settings(cfg) -> dict:
    """The structure model's inference-time settings from the predict settings, as keyword
    arguments of `load_boltz2` / `inference_hparams` (boltz_cp/models/checkpoint.py)."""
    return {
        "predict_args": {
            "recycling_steps": cfg.recycling_steps,
            "sampling_steps": cfg.sampling_steps,
            "diffusion_samples": cfg.diffusion_samples,
            "max_parallel_samples": cfg.max_parallel_samples,
            "write_confidence_summary": True,
            "write_full_pae": cfg.write_full_pae,
            "write_full_pde": cfg.write_full_pde,
        },
        "diffusion_overrides": {"step_scale": cfg.step_scale},
        "steering_args": {"fk_steering": cfg.use_potentials, "physical_guidance_update": cfg.use_potentials},
        "msa_overrides": {"subsample_msa": cfg.subsample_msa, "num_subsampled_msa": cfg.num_subsampled_msa},
        "use_kernels": False,
    }


def run_model(model, batch: dict, cfg, mesh, device: torch.device, precision: str, log) -> dict | None:
    """One featurized batch through the model of `cfg.model.backend` (`run_cp` or `run_reference`),
    with progress lines from hooks on the model's modules."""
    args = model.predict_args
    # Upstream's sampler denoises `torch.arange(samples).chunk(samples % max_parallel_samples + 1)` per
    # step: chunk() may return fewer pieces than asked for.
    samples = args["diffusion_samples"]
    chunks = len(torch.arange(samples).chunk(samples % (args["max_parallel_samples"] or samples) + 1))
    hooks = log.hook_model(model, args["recycling_steps"], args["sampling_steps"], chunks)
    try:
        if cfg.model.backend == "cp":
            return run_cp(model, batch, cfg, mesh, device, precision)
        return run_reference(model, batch, cfg.seed, device, precision)
    finally:
        for h in hooks:
            h.remove()


def run_reference(model, batch: dict, seed: int, device: torch.device, precision: str) -> dict:
    """Upstream's serial `Boltz2.predict_step` on one featurized batch; sampling seeded by `seed`.

    The sampling RNG is reseeded after featurization, so featurizing never shifts the noise.
    """
    from lightning_fabric.utilities.seed import seed_everything

    from boltz_cp.data.inputs import batch_to

    seed_everything(seed, verbose=False)
    with torch.inference_mode(), autocast(precision, device):
        return model.predict_step(batch_to(batch, device), 0)


def run_cp(model, batch: dict, cfg, mesh, device: torch.device, precision: str = "fp32") -> dict | None:
    """The CP model on one featurized batch (every rank of the mesh); upstream's prediction dict
    on the mesh's writer rank (its tile (0, 0)), None elsewhere."""
    batch, layout, inputs, affinity = cut_inputs(model, batch, mesh, device)
    out = forward_cp(model, inputs, layout, cfg.seed, precision, device, affinity)
    return finish_prediction(model, out, batch, layout, mesh, cfg.write_embeddings)


def cut_inputs(model, batch: dict, mesh, device: torch.device):
    """(batch on `device`, layout, this rank's `ModelInputs`, its `AffinityInputs` or None)."""
    from boltz_cp.data.inputs import batch_to
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.models.boltz2 import ModelInputs

    batch = batch_to(batch, device)
    layout = TokenLayout(batch["token_pad_mask"].shape[1], mesh)
    inputs = ModelInputs.cut(batch, layout)
    affinity = None
    if getattr(model, "affinity_prediction", False):  # the affinity pass (boltz_cp/cli/affinity.py)
        from boltz_cp.modules.affinity import AffinityInputs

        affinity = AffinityInputs.cut(batch, layout)
    return batch, layout, inputs, affinity


def forward_cp(model, inputs, layout, seed: int, precision: str, device: torch.device, affinity=None) -> dict:
    """`Boltz2CP.forward` with the model's predict arguments, the global RNG seeded by `seed`."""
    from lightning_fabric.utilities.seed import seed_everything

    args = model.predict_args
    seed_everything(seed, verbose=False)
    with torch.inference_mode(), autocast(precision, device):
        return model(inputs, layout, recycling_steps=args["recycling_steps"],
                     num_sampling_steps=args["sampling_steps"], diffusion_samples=args["diffusion_samples"],
                     max_parallel_samples=args["max_parallel_samples"], affinity=affinity)


def finish_prediction(model, out: dict, batch: dict, layout, mesh, write_embeddings: bool) -> dict | None:
    """Gather `outputs_to_gather(out)` to the writer rank and run upstream's `Boltz2.predict_step`
    post-processing there (confidence score, output keys); None on the other ranks."""
    from boltz.model.models.boltz2 import Boltz2

    from boltz_cp.models.boltz2 import gather_outputs

    with torch.inference_mode():
        full = gather_outputs(outputs_to_gather(out, write_embeddings), layout, dst=mesh.writer)
    if full is None:
        return None
    full.setdefault("z", None)
    return Boltz2.predict_step(ModelStandIn(full, model), batch, 0)


class ModelStandIn:
    """Stands in for the model inside upstream's `Boltz2.predict_step`, whose post-processing
    is reused as is: it has the model's predict-time attributes, and calling it returns the
    outputs of a forward that already ran (gathered from the mesh)."""

    def __init__(self, out: dict, model) -> None:
        self.out = out
        self.predict_args = model.predict_args
        self.confidence_prediction = model.confidence_prediction
        self.alpha_pae = model.alpha_pae
        self.affinity_prediction = model.affinity_prediction
        self.affinity_ensemble = model.affinity_ensemble

    def __call__(self, *args, **kwargs) -> dict:
        return self.out
