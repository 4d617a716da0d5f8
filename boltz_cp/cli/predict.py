"""`boltz_cp predict`: inputs -> Boltz-2 predictions in upstream's output layout.

Output (as upstream): <out_dir>/boltz_results_<stem>/
    processed/{structures,records,msa,constraints,templates,mols}/...
    predictions/<id>/<id>_model_<k>.cif|.pdb, confidence_<id>_model_<k>.json,
                     plddt_/pae_/pde_<id>_model_<k>.npz
                     affinity_<id>.json, pre_affinity_<id>.npz   (affinity property, see
                                                                  cli/affinity.py)
    boltz_cp_config.yaml        the resolved configuration (global rank 0 only)

Every input is processed and predicted in a private staging folder, then moved into place, so
an error or a killed run never leaves a partial prediction behind. A bad input is reported by
name; the other inputs still run, and the command exits non-zero listing the failures.

With dp=D the world is D meshes: pending input k (in collect_inputs order, after the skipped
ones) goes to mesh k % D, whose writer (its tile (0, 0)) writes it; at the end every rank learns
every mesh's failures through the c10d store (cli/faults.py) and all exit alike.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from boltz_cp.cli import faults
from boltz_cp.cli.msa import ServerMsas
from boltz_cp.cli.progress import Progress
from boltz_cp.cli.run import PRECISIONS, model_settings, resolve_precision, run_model
from boltz_cp.data.msa_server import redacted
from boltz_cp.distributed.mesh import auto_mesh, check_mesh_size
from boltz_cp.errors import BoltzCPError, CheckpointError, ConfigError, InputError, RankFailure
from boltz_cp.kernels import BACKENDS as ATTENTION_BACKENDS
from boltz_cp.kernels import set_backend

BACKENDS = ("auto", "reference", "cp")
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
    choice("kernels.attention", cfg.kernels.attention, ATTENTION_BACKENDS)
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
    from boltz_cp.cli.plan import validate_memory_settings

    validate_memory_settings(cfg)
    if not isinstance(cfg.dp, int) or isinstance(cfg.dp, bool) or cfg.dp < 1:
        raise ConfigError(f"dp must be a positive integer, got {cfg.dp!r}")
    if cfg.timeout_s <= 0:
        raise ConfigError("timeout_s must be positive")
    if cfg.use_msa_server:
        from boltz_cp.data.msa_server import MsaServer

        MsaServer.from_config(cfg, None)  # settings upstream refuses fail here, before any work
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _resolve_auto_mesh(cfg, world)
    for key in ("rows", "cols"):
        if not isinstance(cfg.mesh[key], int) or isinstance(cfg.mesh[key], bool) or cfg.mesh[key] < 1:
            raise ConfigError(f"mesh.{key} must be a positive integer, got {cfg.mesh[key]!r}")
    mesh = f"{cfg.mesh.rows}x{cfg.mesh.cols}"
    check_mesh_size(cfg.mesh.rows, cfg.mesh.cols, world, cfg.dp)  # before any rendezvous: fail fast
    if cfg.model.backend == "auto":  # resolved here, so the written config names the backend
        # cp on every mesh: on 1x1 it beats upstream in wall time and peak RSS (benchmarks/RESULTS.md).
        with open_dict(cfg), read_write(cfg):
            cfg.model.backend = "cp"
    if cfg.model.backend == "reference" and mesh != "1x1":
        raise ConfigError(
            f"model.backend=reference runs upstream's serial Boltz-2 on a 1x1 mesh only "
            f"(got mesh={mesh} with {world} process{'es' if world > 1 else ''}); "
            "run it as a single process with mesh=1x1 (or as dp=K meshes of 1x1 on K processes), "
            "or use model.backend=cp"
        )


def _resolve_auto_mesh(cfg: DictConfig, world: int) -> None:
    """mesh=auto: the most square rows x cols of world / dp ranks, written into cfg (so the saved
    config shows the numbers); before any rendezvous, so every rank picks the same."""
    sides = (cfg.mesh.rows, cfg.mesh.cols)
    if "auto" not in sides:
        return
    if sides != ("auto", "auto"):
        raise ConfigError(f"mesh=auto sets both sides; got mesh.rows={sides[0]} mesh.cols={sides[1]}")
    if world % cfg.dp:
        raise ConfigError(f"mesh=auto with dp={cfg.dp} needs a world size divisible by {cfg.dp}, got {world}")
    rows, cols = auto_mesh(world // cfg.dp)
    with open_dict(cfg), read_write(cfg):
        cfg.mesh.rows, cfg.mesh.cols = rows, cols


def predict(cfg: DictConfig, input_arg: str) -> None:
    """Every rank: build the mesh(es), fold this mesh's share of the inputs, and agree on the
    outcome (every rank raises the same InputError listing every mesh's failed inputs)."""
    from boltz_cp.distributed import CPMesh, init_distributed, shutdown_distributed

    validate(cfg)
    set_backend(cfg.kernels.attention)
    ctx = init_distributed(cfg.timeout_s, cfg.device, cfg.dist_backend)
    try:
        mesh = CPMesh.build(cfg.mesh.rows, cfg.mesh.cols, device_type=ctx.device.type, dp=cfg.dp)
        faults.attach_mesh(mesh)
        try:
            failures, files, head, out = _predict_mesh(cfg, input_arg, ctx, mesh)
        except BaseException as e:
            faults.on_failure(e)  # names this rank and its input to the others, before the group goes
            raise
        finally:
            faults.set_input(None)
        _finish(failures, files, head, out, cfg.plots)
    finally:
        shutdown_distributed()


def _predict_mesh(cfg: DictConfig, input_arg: str, ctx, mesh):
    """This mesh's share of the inputs; returns (failures of every mesh, files, job log, out)."""
    from boltz_cp.cli.weights import (
        AFFINITY_CHECKPOINT_NAME,
        CHECKPOINT_NAME,
        MOLS_TAR,
        ensure_downloads,
        wants_affinity,
    )
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.inputs import collect_inputs, required_ccd_codes
    from boltz_cp.models.checkpoint import default_cache, default_checkpoint_path

    writer_rank = mesh.is_writer
    log = Progress(cfg.progress and writer_rank, prefix=f"[mesh {mesh.dp_index}] " if mesh.dp > 1 else "")
    head = Progress(cfg.progress and mesh.rank == 0)  # lines about the whole job
    precision = resolve_precision(cfg.precision, ctx.device)
    torch.set_grad_enabled(False)
    torch.set_float32_matmul_precision("highest")

    input_path = Path(input_arg).expanduser()
    files = collect_inputs(input_path)
    cache = Path(cfg.cache).expanduser() if cfg.cache else default_cache()
    ckpt = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else default_checkpoint_path(cache)
    out = Path(cfg.out_dir).expanduser() / f"boltz_results_{input_path.stem}"
    mol_dir = cache / "mols"
    affinity = wants_affinity(files)
    ensure_downloads(cfg, cache, affinity, ctx.local_rank, head, only=(MOLS_TAR,))  # every rank; weights later

    meshes = f"{mesh.dp} meshes of {mesh.rows}x{mesh.cols}" if mesh.dp > 1 else f"mesh {mesh.rows}x{mesh.cols}"
    head(f"{len(files)} input(s), {meshes}, device {ctx.device}, precision {precision}")
    # One rank looks at the results, so every rank assigns the same pending inputs to the same mesh.
    pending = faults.share_from_rank0(_pending(files, out, cfg.override, head) if mesh.rank == 0 else None,
                                      cfg.timeout_s)
    mine = pending[mesh.dp_index::mesh.dp]  # pending input k -> mesh k % dp
    if mesh.dp > 1:
        log(f"{len(mine)} of {len(pending)} pending input(s) on this mesh: "
            + (", ".join(files[i].name for i in mine) or "none"))
    failures: list[tuple[int, str]] = []  # (input index, message), on the writer
    msas = ServerMsas(cfg, cache)  # use_msa_server: rank 0 fetches for every mesh (cli/msa.py)
    msas.fetch(files, pending, mol_dir, cfg.seed, mesh.rank, head, cfg.timeout_s)

    def fail(i: int, e: BoltzCPError) -> None:
        failures.append((i, str(e)))
        log(f"{files[i].name}: FAILED: {e}")

    # Cheap checks of every input (format, entities, SMILES, CCD codes) before the model loads.
    todo: list[int] = []
    for i in mine:
        faults.set_input(files[i].name)
        try:
            ensure_molecules(mol_dir, required_ccd_codes(files[i]), log=log)
            todo.append(i)
        except InputError as e:
            fail(i, e)
    faults.set_input(None)
    from boltz_cp.cli.plan import check_fits  # the plan's memory check, before any weights download or load

    check_fits(cfg, [files[i] for i in pending], mol_dir, ctx.device, mesh, msas, head)
    ensure_downloads(cfg, cache, affinity, ctx.local_rank, head, only=(CHECKPOINT_NAME, AFFINITY_CHECKPOINT_NAME))
    if todo:
        model, affinity_model, precision = _load_models(cfg, [files[i] for i in todo], cache, ckpt, ctx.device,
                                                        precision, log, writer_rank)
    if mesh.rank == 0 and pending:
        _prepare_results(cfg, out, precision, ctx)
    for i in todo:
        faults.set_input(files[i].name)
        try:
            with log.upstream_stdout(writer_rank):
                _predict_one(cfg, model, files[i], out, mol_dir, ctx.device, precision, log, writer_rank, mesh,
                             affinity_model, msas)
        except InputError as e:
            fail(i, e)
        except BoltzCPError as e:
            # Other errors fail the input only where no peer can be left inside a collective.
            if mesh.size > 1 or isinstance(e, (ConfigError, CheckpointError, RankFailure)):
                raise
            fail(i, e)
    faults.set_input(None)
    every = faults.gather_meshes(failures if writer_rank else None, writer_rank)
    return sorted(tuple(f) for part in every for f in part), files, head, out


def _pending(files: list[Path], out: Path, override: bool, log) -> list[int]:
    """Indices of the inputs to predict: all with override, else those without predictions."""
    pending = []
    for i, path in enumerate(files):
        if (out / "predictions" / path.stem).exists() and not override:
            log(f"{path.name}: predictions exist in {out / 'predictions' / path.stem}, skipping "
                "(override=true recomputes)")
            continue
        pending.append(i)
    return pending


def _load_models(cfg, todo: list[Path], cache: Path, ckpt: Path, device, precision: str, log, warn: bool):
    """(structure model, affinity model or None, precision) on `device`, the affinity model on the
    CPU until its pass."""
    from boltz_cp.cli.affinity import affinity_checkpoint_path, load_affinity_model
    from boltz_cp.data.affinity import affinity_binder
    from boltz_cp.models.checkpoint import load_boltz2, require_affinity_checkpoint

    # Before any model loads: an input asking for affinity needs the affinity checkpoint.
    affinity_ckpt = None
    if any(affinity_binder(p) is not None for p in todo):
        affinity_ckpt = require_affinity_checkpoint(affinity_checkpoint_path(cfg, cache))
    log(f"loading checkpoint {ckpt}")
    model, info = load_boltz2(ckpt, **model_settings(cfg), cp=cfg.model.backend == "cp")
    model.to(device)
    if info.get("random_preset") and warn:
        log.warn(
            f"WARNING: {ckpt} holds RANDOM weights (preset '{info['random_preset']}'): "
            "the predicted structures are not meaningful"
        )
    affinity_model = None
    if affinity_ckpt is not None:
        log(f"loading affinity checkpoint {affinity_ckpt}")
        affinity_model, affinity_info = load_affinity_model(cfg, affinity_ckpt)
        if affinity_info.get("random_preset") and warn:
            log.warn(f"WARNING: {affinity_ckpt} holds RANDOM weights (preset '{affinity_info['random_preset']}'): "
                     "the predicted affinities are not meaningful")
    return model, affinity_model, precision


def _prepare_results(cfg, out: Path, precision: str, ctx) -> None:
    """Global rank 0, once: the results folder, stale staging removed, the resolved config (with
    the precision, device, process-group backend and attention kernel used, not `auto`)."""
    from boltz_cp.kernels.attention import resolve

    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    kernel = resolve(cfg.kernels.attention, ctx.device, torch.float32)
    used = OmegaConf.merge(cfg, {"precision": precision, "device": ctx.device.type, "dist_backend": ctx.backend,
                                 "kernels": {"attention": kernel}})
    _atomic_write_text(out / "boltz_cp_config.yaml", OmegaConf.to_yaml(redacted(used)))  # no secrets


def _finish(failures: list[tuple[int, str]], files: list[Path], log, out: Path, plots: bool = False) -> None:
    """Every rank: the failures of every mesh in input order (one input: its own message)."""
    if failures and len(files) == 1:
        raise InputError(failures[0][1])
    if failures:
        raise InputError(f"{len(failures)} of {len(files)} inputs failed:\n  "
                         + "\n  ".join(f"{files[i].name}: {msg}" for i, msg in failures))
    from boltz_cp.plots import available

    pictures = (f"; PAE and pLDDT plots (PNG) next to each model in {out / 'predictions'}/<id>"
                if plots and available() else "")
    log(f"done: results in {out}{pictures}")


def _predict_one(cfg, model, path: Path, out: Path, mol_dir: Path, device, precision, log, writer_rank,
                 mesh, affinity_model=None, msas=None) -> None:
    from boltz.data.write.writer import BoltzWriter

    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, write_processed

    staging = _staging_dir(out, path.stem, writer_rank)
    try:
        log(f"{path.name}: parsing and featurizing")
        dirs = ProcessedDirs(staging / "processed").make()
        target = parse_target(path, mol_dir, cfg.seed)
        if msas is not None:
            msas.attach(path, target, staging / "server_msa")
        record = write_processed(target, path, dirs, cfg.max_msa_seqs)
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
            skip = {k for k, on in (("pae", cfg.write_full_pae), ("pde", cfg.write_full_pde)) if not on}
            kept = {k: v for k, v in pred.items() if k not in skip}
            writer.write_on_batch_end(None, None, kept, None, batch, 0, 0)

        if record.affinity:  # every rank: the writer's top model is the affinity pass's input
            from boltz_cp.cli.affinity import predict_affinity, write_and_share
            from boltz_cp.data.affinity import pre_affinity_name

            write_and_share(write_structures, staged / record.id / pre_affinity_name(record.id), mesh, device)
            predict_affinity(cfg, affinity_model, record, dirs, staged, mol_dir, device, precision, log, mesh)
        elif writer_rank:
            write_structures()
        if not writer_rank:
            return
        if cfg.plots:
            from boltz_cp.plots import write_plots

            write_plots(pred, batch["asym_id"][0], {c.chain_id: c.chain_name for c in record.chains}, record.id,
                        staged / record.id, log)
        _publish(staging, out, record.id)
        log(f"{record.id}: wrote {out / 'predictions' / record.id}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
