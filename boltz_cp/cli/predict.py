"""`boltz_cp predict`: inputs -> Boltz-2 predictions in upstream's output layout.

Output (as upstream): <out_dir>/boltz_results_<stem>/
    processed/{structures,records,msa,constraints,templates,mols}/...
    predictions/<id>/<id>_model_<k>.cif|.pdb, confidence_<id>_model_<k>.json,
                     plddt_/pae_/pde_<id>_model_<k>.npz
                     affinity_<id>.json, pre_affinity_<id>.npz   (affinity property, see
                                                                  cli/affinity.py)
    boltz_cp_config.yaml        the resolved configuration (writer rank only)

Every input is processed and predicted in a private staging folder, then moved into place, so
an error or a killed run never leaves a partial prediction behind. A bad input is reported by
name; the other inputs still run, and the command exits non-zero listing the failures.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from boltz_cp.cli.progress import Progress
from boltz_cp.distributed.mesh import check_mesh_size
from boltz_cp.errors import BoltzCPError, ConfigError, InputError

BACKENDS = ("auto", "reference", "cp")
PRECISIONS = ("auto", "fp32", "bf16-mixed")
FORMATS = ("mmcif", "pdb")
DEVICES = ("auto", "cpu", "cuda")


def validate(cfg: DictConfig) -> None:
    """Check values before any process group or file is touched (cheap, identical on all ranks)."""

    def choice(key: str, value, options) -> None:
        if value not in options:
            raise ConfigError(f"{key}={value} is not one of {', '.join(map(str, options))}")

    choice("model.backend", cfg.model.backend, BACKENDS)
    choice("precision", cfg.precision, PRECISIONS)
    choice("output_format", cfg.output_format, FORMATS)
    choice("device", cfg.device, DEVICES)
    for key in ("recycling_steps", "sampling_steps", "diffusion_samples", "seed", "sampling_steps_affinity",
                "diffusion_samples_affinity"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ConfigError(f"{key} must be a non-negative integer, got {cfg[key]!r}")
    for key in ("sampling_steps", "sampling_steps_affinity"):
        if cfg[key] < 2:
            # Upstream's EDM schedule divides by sampling_steps - 1: one step gives NaN coordinates.
            raise ConfigError(f"{key} must be at least 2, got {cfg[key]}")
    for key in ("diffusion_samples", "diffusion_samples_affinity"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1")
    if not isinstance(cfg.affinity_mw_correction, bool):
        raise ConfigError(f"affinity_mw_correction must be true or false, got {cfg.affinity_mw_correction!r}")
    if cfg.max_parallel_samples is not None and cfg.max_parallel_samples < 1:
        raise ConfigError("max_parallel_samples must be at least 1 (or null)")
    for key in ("rows", "cols"):
        if not isinstance(cfg.mesh[key], int) or cfg.mesh[key] < 1:
            raise ConfigError(f"mesh.{key} must be a positive integer, got {cfg.mesh[key]!r}")
    if cfg.timeout_s <= 0:
        raise ConfigError("timeout_s must be positive")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = f"{cfg.mesh.rows}x{cfg.mesh.cols}"
    check_mesh_size(cfg.mesh.rows, cfg.mesh.cols, world)  # before any rendezvous: fail fast
    if cfg.model.backend == "auto":  # resolved here, so the written config names the backend
        with open_dict(cfg), read_write(cfg):
            cfg.model.backend = "reference" if world == 1 and mesh == "1x1" else "cp"
    if cfg.model.backend == "reference" and (world != 1 or mesh != "1x1"):
        raise ConfigError(
            f"model.backend=reference runs upstream's serial Boltz-2 on a 1x1 mesh only "
            f"(got mesh={mesh} with {world} process{'es' if world > 1 else ''}); "
            "run it as a single process with mesh=1x1, or use model.backend=cp"
        )
    if cfg.model.backend == "cp":
        if cfg.mesh.rows != cfg.mesh.cols:
            raise ConfigError(f"model.backend=cp needs a square mesh for now, got mesh={mesh}")
        if cfg.precision == "bf16-mixed":
            raise ConfigError("model.backend=cp runs in fp32 only for now (precision=fp32)")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16-mixed as Lightning does it (autocast, fp32 weights); fp32 runs with no autocast at all."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def predict(cfg: DictConfig, input_arg: str) -> None:
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.inputs import collect_inputs, required_ccd_codes
    from boltz_cp.distributed import CPMesh, init_distributed, shutdown_distributed
    from boltz_cp.models.checkpoint import default_cache, default_checkpoint_path, load_boltz2

    validate(cfg)
    ctx = init_distributed(cfg.timeout_s, cfg.device)
    try:
        mesh = CPMesh.build(cfg.mesh.rows, cfg.mesh.cols, device_type=ctx.device.type)
        writer_rank = mesh.rank == 0
        log = Progress(cfg.progress and writer_rank)
        precision = resolve_precision(cfg.precision, ctx.device)
        torch.set_grad_enabled(False)
        torch.set_float32_matmul_precision("highest")

        input_path = Path(input_arg).expanduser()
        files = collect_inputs(input_path)
        cache = Path(cfg.cache).expanduser() if cfg.cache else default_cache()
        ckpt = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else default_checkpoint_path(cache)
        out = Path(cfg.out_dir).expanduser() / f"boltz_results_{input_path.stem}"
        mol_dir = cache / "mols"

        log(f"{len(files)} input(s), mesh {mesh.rows}x{mesh.cols}, device {ctx.device}, precision {precision}")
        # Cheap checks of every input (format, entities, SMILES, CCD codes) before the model loads.
        failures: list[str] = []
        todo: list[Path] = []

        def fail(path: Path, e: InputError) -> None:
            if len(files) == 1:
                raise e
            failures.append(f"{path.name}: {e}")
            log(f"{path.name}: FAILED: {e}")

        for path in files:
            if (out / "predictions" / path.stem).exists() and not cfg.override:
                log(f"{path.name}: predictions exist in {out / 'predictions' / path.stem}, skipping "
                    "(override=true recomputes)")
                continue
            try:
                ensure_molecules(mol_dir, required_ccd_codes(path))
                todo.append(path)
            except InputError as e:
                fail(path, e)
        if not todo:
            _finish(failures, files, log, out)
            return
        from boltz_cp.cli.affinity import affinity_checkpoint_path, load_affinity_model
        from boltz_cp.data.affinity import affinity_binder
        from boltz_cp.models.checkpoint import require_affinity_checkpoint

        # Before any model loads: an input asking for affinity needs the affinity checkpoint.
        affinity_ckpt = None
        if any(affinity_binder(p) is not None for p in todo):
            affinity_ckpt = require_affinity_checkpoint(affinity_checkpoint_path(cfg, cache))
        log(f"loading checkpoint {ckpt}")
        model, info = load_boltz2(
            ckpt,
            predict_args={
                "recycling_steps": cfg.recycling_steps,
                "sampling_steps": cfg.sampling_steps,
                "diffusion_samples": cfg.diffusion_samples,
                "max_parallel_samples": cfg.max_parallel_samples,
                "write_confidence_summary": True,
                "write_full_pae": cfg.write_full_pae,
                "write_full_pde": cfg.write_full_pde,
            },
            diffusion_overrides={"step_scale": cfg.step_scale},
            steering_args={
                "fk_steering": cfg.use_potentials,
                "physical_guidance_update": cfg.use_potentials,
            },
            msa_overrides={"subsample_msa": cfg.subsample_msa, "num_subsampled_msa": cfg.num_subsampled_msa},
            use_kernels=False,
            cp=cfg.model.backend == "cp",
        )
        if cfg.model.backend == "cp":
            precision = "fp32"
        model.to(ctx.device)
        if info.get("random_preset") and writer_rank:
            log.warn(
                f"WARNING: {ckpt} holds RANDOM weights (preset '{info['random_preset']}'): "
                "the predicted structures are not meaningful"
            )
        affinity_model = None
        if affinity_ckpt is not None:
            log(f"loading affinity checkpoint {affinity_ckpt}")
            affinity_model, affinity_info = load_affinity_model(cfg, affinity_ckpt)
            if affinity_info.get("random_preset") and writer_rank:
                log.warn(f"WARNING: {affinity_ckpt} holds RANDOM weights (preset '{affinity_info['random_preset']}'): "
                         "the predicted affinities are not meaningful")
        if writer_rank:
            out.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(out)
            _atomic_write_text(out / "boltz_cp_config.yaml", OmegaConf.to_yaml(cfg))

        for path in todo:
            try:
                _predict_one(cfg, model, path, out, mol_dir, ctx.device, precision, log, writer_rank, mesh,
                             affinity_model)
            except InputError as e:
                fail(path, e)
        _finish(failures, files, log, out)
    finally:
        shutdown_distributed()


def _finish(failures: list[str], files: list[Path], log, out: Path) -> None:
    if failures:
        raise InputError(f"{len(failures)} of {len(files)} inputs failed:\n  " + "\n  ".join(failures))
    log(f"done: results in {out}")


def _predict_one(cfg, model, path: Path, out: Path, mol_dir: Path, device, precision, log, writer_rank,
                 mesh, affinity_model=None) -> None:
    from boltz.data.write.writer import BoltzWriter

    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, write_processed

    staging = _staging_dir(out, path.stem, writer_rank)
    try:
        log(f"{path.name}: parsing and featurizing")
        dirs = ProcessedDirs(staging / "processed").make()
        record = write_processed(parse_target(path, mol_dir, cfg.seed), path, dirs, cfg.max_msa_seqs)
        cp = cfg.model.backend == "cp"
        batch = (featurize_lean if cp else featurize)(record, dirs, mol_dir, seed=cfg.seed, method=cfg.method)
        n_tokens = int(batch["token_pad_mask"].sum())
        log(f"{record.id}: {n_tokens} tokens, {int(batch['atom_pad_mask'].sum())} atoms")
        if record.affinity:
            assert affinity_model is not None, "inputs asking for affinity load the affinity model"
            log(f"{record.id}: affinity property: a second pass after the structure")

        try:
            pred = run_model(model, batch, cfg, mesh, device, precision, log)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
                raise
            raise BoltzCPError(f"{record.id}: out of memory on {device} at {n_tokens} tokens "
                               f"(mesh {mesh.rows}x{mesh.cols}); a larger mesh holds less per rank") from None
        if pred is not None and pred.get("exception"):
            raise BoltzCPError(f"{record.id}: out of memory on {device} at {n_tokens} tokens")
        staged = staging / "predictions"

        def write_structures() -> None:
            writer = BoltzWriter(
                data_dir=str(dirs.structures),
                output_dir=str(staged),
                output_format=cfg.output_format,
                boltz2=True,
                write_embeddings=cfg.write_embeddings,
            )
            writer.write_on_batch_end(None, None, pred, None, batch, 0, 0)

        if record.affinity:  # every rank: the writer's top model is the affinity pass's input
            from boltz_cp.cli.affinity import predict_affinity, write_and_share
            from boltz_cp.data.affinity import pre_affinity_name

            write_and_share(write_structures, staged / record.id / pre_affinity_name(record.id), mesh, device)
            predict_affinity(cfg, affinity_model, record, dirs, staged, mol_dir, device, precision, log, mesh)
        elif writer_rank:
            write_structures()
        if not writer_rank:
            return
        _publish(staging, out, record.id)
        log(f"{record.id}: wrote {out / 'predictions' / record.id}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_model(model, batch: dict, cfg, mesh, device: torch.device, precision: str, log) -> dict | None:
    """One featurized batch through the model of `cfg.model.backend` (`run_cp` or `run_reference`),
    with progress lines from hooks on the model's modules."""
    args = model.predict_args
    # Upstream's sampler denoises `samples % max_parallel_samples + 1` chunks per step.
    chunks = args["diffusion_samples"] % (args["max_parallel_samples"] or args["diffusion_samples"]) + 1
    hooks = log.hook_model(model, args["recycling_steps"], args["sampling_steps"], chunks)
    try:
        if cfg.model.backend == "cp":
            return run_cp(model, batch, cfg, mesh, device)
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


def run_cp(model, batch: dict, cfg, mesh, device: torch.device) -> dict | None:
    """The CP model on one featurized batch (every rank); upstream's prediction dict on the
    writer rank (rank 0), None elsewhere. Seeded like `run_reference`, so the same seed samples
    the same noise as the serial model."""
    from boltz.model.models.boltz2 import Boltz2
    from lightning_fabric.utilities.seed import seed_everything

    from boltz_cp.data.inputs import batch_to
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.models.boltz2 import ModelInputs, gather_outputs

    batch = batch_to(batch, device)
    layout = TokenLayout(batch["token_pad_mask"].shape[1], mesh)
    inputs = ModelInputs.cut(batch, layout)
    affinity = None
    if model.affinity_prediction:  # the affinity pass (boltz_cp/cli/affinity.py)
        from boltz_cp.modules.affinity import AffinityInputs

        affinity = AffinityInputs.cut(batch, layout)
    args = model.predict_args
    seed_everything(cfg.seed, verbose=False)
    with torch.inference_mode():
        out = model(inputs, layout, recycling_steps=args["recycling_steps"],
                    num_sampling_steps=args["sampling_steps"], diffusion_samples=args["diffusion_samples"],
                    max_parallel_samples=args["max_parallel_samples"], affinity=affinity)
        # The trunk's z and the distogram are N x N: gathered to the writer only for embeddings.
        keep = {k: v for k, v in out.items() if k not in ("pdistogram", "relative_position_encoding")
                and (cfg.write_embeddings or k != "z")}
        full = gather_outputs(keep, layout, dst=0)
    if full is None:
        return None
    full.setdefault("z", None)
    return Boltz2.predict_step(_Finished(full, model), batch, 0)


class _Finished:
    """Stands in for the model inside upstream's `Boltz2.predict_step`, whose post-processing
    (confidence score, output keys) is reused as is: calling it returns the gathered outputs."""

    def __init__(self, out: dict, model) -> None:
        self.out = out
        self.predict_args = model.predict_args
        self.confidence_prediction = model.confidence_prediction
        self.alpha_pae = model.alpha_pae
        self.affinity_prediction = model.affinity_prediction
        self.affinity_ensemble = model.affinity_ensemble

    def __call__(self, *args, **kwargs) -> dict:
        return self.out


def _staging_dir(out: Path, stem: str, writer: bool) -> Path:
    """Where a rank prepares an input. The writer: a hidden folder in the results, published by
    rename and tagged with its host and pid, so that a later run can remove it if the writer was
    killed; every other rank publishes nothing and works in a private temporary folder, so a rank
    that dies leaves nothing in the results."""
    if not writer:
        return Path(tempfile.mkdtemp(prefix=f"boltz_cp_{stem}_"))
    staging = out / f".staging-{stem}-{os.getpid()}"
    staging.mkdir(parents=True)
    (staging / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return staging


_OWNER = ".owner"


def _remove_stale_staging(out: Path) -> None:
    """Remove staging folders in `out` left by a killed writer on this host (its pid is gone)."""
    for staging in out.glob(".staging-*"):
        try:
            host, pid = (staging / _OWNER).read_text().split()
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _publish(staging: Path, out: Path, record_id: str) -> None:
    """Move a finished staging folder into the results; each file or folder lands by rename."""
    for src in sorted((staging / "processed").rglob("*")):
        if src.is_file():
            dst = out / "processed" / src.relative_to(staging / "processed")
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    final = out / "predictions" / record_id
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".old-{record_id}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(staging / "predictions" / record_id, final)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
