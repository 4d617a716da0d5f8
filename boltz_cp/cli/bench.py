"""`python -m boltz_cp.bench INPUT [key=value ...]`: one CP prediction, timed per stage, with
per-rank peak memory.

    python -m boltz_cp.bench complex.yaml                                   # 1x1, real weights
    torchrun --nproc-per-node 4 -m boltz_cp.bench complex.yaml mesh=2x2
    python -m boltz_cp.bench complex.yaml preset=full blocks.pairformer=1 blocks.msa=1 \
        blocks.template=1 blocks.confidence=1 recycling_steps=0 sampling_steps=2

Settings: every `boltz_cp predict` setting (configs/predict.yaml) plus configs/bench.yaml:
`preset=tiny|full` builds RANDOM weights of that architecture in memory (no checkpoint file);
otherwise `checkpoint=` (default `<cache>/boltz2_conf.ckpt`) is read (memory-mapped, so the
ranks of a node share the file's pages). `blocks.<stack>=K` runs only the first K blocks of a
stack (a checkpoint's weights of the dropped blocks are ignored): pairformer, msa, template,
confidence, token_transformer, atom_encoder, atom_decoder. `warmup=true` runs the forward once
untimed first; `write=false` skips writing the output files; `json=PATH` saves the report.

What runs is `boltz_cp predict`'s CP path on one input (parse + `featurize_lean` on every rank,
`ModelInputs.cut`, `Boltz2CP.forward` seeded by `seed`, gather to rank 0, upstream's writer).
Stages are timed by forward hooks on the model's submodules (wall clock, `torch.cuda.synchronize`
first on CUDA). Memory, per rank and stage:
  CPU: peak C-heap bytes in use (glibc mallinfo2, sampled after every aten op, as
       benchmarks/_common.py does) during the stage, minus the bytes in use when the forward
       started (weights and inputs excluded); stages outside the forward count from their own
       start. Plus the process's peak RSS (VmHWM) and the absolute heap peak.
  CUDA: torch.cuda.max_memory_allocated during the stage, minus the bytes allocated when the
       forward started; plus the absolute peak.
Rank 0 gathers every rank's figures and prints two markdown tables (stages, ranks) and one
`BENCH_JSON {...}` line.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from boltz_cp.errors import BoltzCPError, ConfigError
from boltz_cp.kernels import set_backend

USAGE = """\
usage: python -m boltz_cp.bench INPUT [key=value ...] [--cfg job] [--help]
       torchrun --nproc-per-node K -m boltz_cp.bench INPUT mesh=RxC [key=value ...]

Runs the CP model on one Boltz-2 .yaml/.fasta input and prints per-stage wall time and
per-rank peak memory. Random weights without a checkpoint file: preset=full (Boltz-2's widths)
or preset=tiny; fewer blocks: blocks.pairformer=K (also msa, template, confidence,
token_transformer, atom_encoder, atom_decoder); shorter runs: recycling_steps=0 sampling_steps=2.
"""

MIB = 2**20

# blocks.<name> -> the hyperparameter paths it sets (upstream's hparams layout).
BLOCK_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pairformer": (("pairformer_args", "num_blocks"),),
    "msa": (("msa_args", "msa_blocks"),),
    "template": (("template_args", "template_blocks"),),
    "confidence": (("confidence_model_args", "pairformer_args", "num_blocks"),),
    "token_transformer": (("score_model_args", "token_transformer_depth"),),
    "atom_encoder": (("score_model_args", "atom_encoder_depth"), ("embedder_args", "atom_encoder_depth")),
    "atom_decoder": (("score_model_args", "atom_decoder_depth"),),
}


# ----------------------------------------------------------------------------------------------
# Memory meters
# ----------------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_LIBC = None


def heap_in_use() -> int:
    """Bytes the C heap has handed out now (small blocks plus mmapped ones); glibc only."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallinfo2.restype = _MallInfo2
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def rss_peak() -> int:
    """The process's peak resident set size in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class HeapMeter(TorchDispatchMode):
    """CPU: within the block, `peak()` is the largest heap_in_use() seen after any aten op since
    the last `reset()`."""

    kind = "cpu heap"

    def __init__(self) -> None:
        super().__init__()
        self._peak = heap_in_use()
        self.max_seen = self._peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = heap_in_use()
        if now > self._peak:
            self._peak = now
        return out

    def now(self) -> int:
        return heap_in_use()

    def peak(self) -> int:
        return max(self._peak, heap_in_use())

    def reset(self) -> None:
        self.max_seen = max(self.max_seen, self.peak())
        self._peak = heap_in_use()


class CudaMeter:
    """CUDA: torch's allocator statistics on the current device."""

    kind = "cuda allocated"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        torch.cuda.reset_peak_memory_stats(device)
        self.max_seen = torch.cuda.max_memory_allocated(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def now(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset(self) -> None:
        self.max_seen = max(self.max_seen, self.peak())
        torch.cuda.reset_peak_memory_stats(self.device)


# ----------------------------------------------------------------------------------------------
# Stage recorder
# ----------------------------------------------------------------------------------------------


@dataclass
class _Open:
    name: str
    t0: float
    cpu0: float
    start: int
    peak: int
    ref: int | None


@dataclass
class StageRecorder:
    """Nested stages timed by wall clock, each with the peak memory seen while it was open.

    `begin(name)` / `end(name)` bracket a stage (hooks call them); stages may nest (the parent's
    peak includes the child's). A record: stage, seconds, peak bytes above `ref` (the bytes in use
    when the forward began, for stages inside it; the stage's own start bytes otherwise).
    """

    meter: Any
    sync: Callable[[], None]
    log: Callable[[str], None] | None = None
    records: list[dict] = field(default_factory=list)
    ref: int | None = None  # set while the forward runs
    t_origin: float = field(default_factory=time.perf_counter)
    _open: list[_Open] = field(default_factory=list)

    def begin(self, name: str) -> None:
        self.sync()
        peak = self.meter.peak()
        for o in self._open:
            o.peak = max(o.peak, peak)
        self.meter.reset()
        now = self.meter.now()
        self._open.append(_Open(name, time.perf_counter(), time.process_time(), now, now, self.ref))

    def end(self, name: str) -> None:
        self.sync()
        t1, cpu1 = time.perf_counter(), time.process_time()
        o = self._open.pop()
        if o.name != name:
            raise RuntimeError(f"bench: stage {name!r} ended while {o.name!r} was open")
        peak = max(o.peak, self.meter.peak())
        if self._open:
            self._open[-1].peak = max(self._open[-1].peak, peak)
        ref = o.start if o.ref is None else o.ref
        self.records.append({"stage": name, "start": o.t0 - self.t_origin, "seconds": t1 - o.t0,
                             "cpu_seconds": cpu1 - o.cpu0, "peak_bytes": peak - ref,
                             "depth": len(self._open)})
        if self.log is not None and len(self._open) <= 1:
            self.log(f"{name}: {t1 - o.t0:.2f} s, peak {(peak - ref) / MIB:.1f} MiB")

    def add(self, name: str, t0: float, seconds: float, cpu_seconds: float) -> None:
        """A stage timed outside the recorder (no memory figure)."""
        self.records.append({"stage": name, "start": t0 - self.t_origin, "seconds": seconds,
                             "cpu_seconds": cpu_seconds, "peak_bytes": None, "depth": 0})
        if self.log is not None:
            self.log(f"{name}: {seconds:.2f} s")

    def stage(self, name: str):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.begin(name)

            def __exit__(self, exc_type, *exc):
                if exc_type is None:
                    rec.end(name)

        return _Ctx()


# Submodule -> stage name; called once per forward unless noted.
MODULE_STAGES = (
    ("input_embedder", "trunk: input embedder"),
    ("template_module", "trunk: templates"),  # per recycle
    ("msa_module", "trunk: MSA module"),  # per recycle
    ("pairformer_module", "trunk: pairformer"),  # per recycle
    ("distogram_module", "trunk: distogram"),
    ("diffusion_conditioning", "diffusion conditioning"),
    ("structure_module.score_model", "diffusion step (score model)"),  # per step and sample chunk
    ("bfactor_module", "b-factor head"),
    ("confidence_module", "confidence"),
    ("confidence_module.pairformer_stack", "confidence: pairformer"),
    ("confidence_module.confidence_heads", "confidence: heads"),
)
TRUNK = "trunk (embedder, recycles, distogram)"
RECYCLE = "trunk: recycle (templates + MSA + pairformer)"
SAMPLING = "sampling (all steps)"


def hook_stages(model, rec: StageRecorder) -> Callable[[], None]:
    """Register the stage hooks on `model`; returns a function that removes them."""
    handles = []
    undo = []

    def attach(module, name):
        handles.append(module.register_forward_pre_hook(lambda _m, _a: rec.begin(name)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: rec.end(name)))

    first_of_recycle = "template_module" if getattr(model, "use_templates", False) else "msa_module"
    for path, name in MODULE_STAGES:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is None:
            continue
        if path == "input_embedder":  # the trunk opens with the embedder
            handles.append(module.register_forward_pre_hook(lambda _m, _a: rec.begin(TRUNK)))
        if path == first_of_recycle:  # the recycle opens before its first module
            handles.append(module.register_forward_pre_hook(lambda _m, _a: rec.begin(RECYCLE)))
        attach(module, name)
        if path == "pairformer_module":  # ... and closes after the pairformer
            handles.append(module.register_forward_hook(lambda _m, _a, _o: rec.end(RECYCLE)))
        if path == "distogram_module":  # the trunk closes after the distogram
            handles.append(module.register_forward_hook(lambda _m, _a, _o: rec.end(TRUNK)))

    sm = model.structure_module
    sample = sm.sample

    def timed_sample(*args, **kwargs):
        with rec.stage(SAMPLING):
            return sample(*args, **kwargs)

    sm.sample = timed_sample
    undo.append(lambda: delattr(sm, "sample"))

    def remove() -> None:
        for h in handles:
            h.remove()
        for u in undo:
            u()

    return remove


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _set(hp: dict, path: tuple[str, ...], value: int) -> int | None:
    node = hp
    for key in path[:-1]:
        if node.get(key) is None:
            return None
        node = node[key]
    old = node.get(path[-1])
    node[path[-1]] = value
    return old


def apply_blocks(hp: dict, blocks: dict, limit_to_existing: bool) -> dict[str, int]:
    """Set the block counts of `blocks` (name -> K or None) in hp, in place; returns the counts
    in effect. With `limit_to_existing` a count above the architecture's own is refused (its
    weights do not exist)."""
    unknown = sorted(set(blocks) - set(BLOCK_KEYS))
    if unknown:
        raise ConfigError(f"unknown blocks.{unknown[0]} (known: {', '.join(BLOCK_KEYS)})")
    used = {}
    for name, paths in BLOCK_KEYS.items():
        value = blocks.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"blocks.{name} must be a positive integer or null, got {value!r}")
        for path in paths:
            node = hp
            for key in path[:-1]:
                node = node.get(key) or {}
            own = node.get(path[-1])
            if value is not None and own is not None:
                if limit_to_existing and value > own:
                    raise ConfigError(f"blocks.{name}={value}: the checkpoint has only {own} "
                                      f"(no weights for more)")
                _set(hp, path, value)
            if own is not None and name not in used:
                used[name] = value if value is not None else own
    return used


def _plain_hparams(hp) -> dict:
    from boltz_cp.models.checkpoint import _plain

    return {k: copy.deepcopy(_plain(v)) for k, v in dict(hp).items()}


def _inference_hparams(hp: dict, cfg: DictConfig) -> dict:
    """The inference-time knobs `load_boltz2` sets, from the predict settings."""
    from boltz_cp.models.checkpoint import (
        MSA_OVERRIDE_KEYS,
        _diffusion_override_keys,
        _merge_overrides,
        _upstream_steering_defaults,
    )

    hp["predict_args"] = {
        "recycling_steps": cfg.recycling_steps, "sampling_steps": cfg.sampling_steps,
        "diffusion_samples": cfg.diffusion_samples, "max_parallel_samples": cfg.max_parallel_samples,
        "write_confidence_summary": True, "write_full_pae": cfg.write_full_pae,
        "write_full_pde": cfg.write_full_pde,
    }
    steering = _upstream_steering_defaults()
    hp["steering_args"] = _merge_overrides(steering, {"fk_steering": cfg.use_potentials,
                                                      "physical_guidance_update": cfg.use_potentials},
                                           set(steering), "steering")
    hp["diffusion_process_args"] = _merge_overrides(hp.get("diffusion_process_args"),
                                                    {"step_scale": cfg.step_scale},
                                                    _diffusion_override_keys(), "diffusion")
    hp["msa_args"] = _merge_overrides(hp.get("msa_args"), {"subsample_msa": cfg.subsample_msa,
                                                           "num_subsampled_msa": cfg.num_subsampled_msa},
                                      MSA_OVERRIDE_KEYS, "msa")
    hp["use_kernels"] = False
    hp["ema"] = False
    return hp


def build_model(cfg: DictConfig, cache: Path) -> tuple[Any, dict]:
    """The CP model the settings describe -> (model, info). preset=: random weights (randomize_,
    seeded by weights_seed); else the checkpoint, memory-mapped, first K blocks of each stack."""
    from boltz_cp.models.boltz2 import Boltz2CP
    from boltz_cp.models.checkpoint import (
        PRESETS,
        RANDOM_MARKER,
        default_checkpoint_path,
        read_checkpoint,
    )

    blocks = dict(OmegaConf.to_container(cfg.blocks, resolve=True) or {})
    if cfg.preset is not None:
        if cfg.checkpoint is not None:
            raise ConfigError("give preset= (random weights) or checkpoint= (a file), not both")
        if cfg.preset not in PRESETS:
            raise ConfigError(f"preset={cfg.preset} is not one of {', '.join(sorted(PRESETS))}")
        hp = copy.deepcopy(PRESETS[cfg.preset])
        used = apply_blocks(hp, blocks, limit_to_existing=False)
        model = Boltz2CP(_inference_hparams(hp, cfg))
        from boltz_cp.parity.reference import randomize_

        randomize_(model, torch.Generator().manual_seed(cfg.weights_seed))
        info = {"weights": f"preset {cfg.preset} (RANDOM weights, seed {cfg.weights_seed})", "random": True}
    else:
        path = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else default_checkpoint_path(cache)
        if not path.is_file():
            read_checkpoint(path)  # raises the loader's own message (where to get the weights)
        try:
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception:  # noqa: BLE001 -- not mmap-able (legacy format): the plain reader
            ckpt = read_checkpoint(path)
        hp = _plain_hparams(ckpt["hyper_parameters"])
        used = apply_blocks(hp, blocks, limit_to_existing=True)
        model = Boltz2CP(_inference_hparams(hp, cfg))
        state = ckpt["state_dict"]
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ConfigError(f"checkpoint {path} lacks {len(missing)} weights of the model "
                              f"(e.g. {', '.join(missing[:3])})")
        model.load_state_dict({k: state[k] for k in wanted}, strict=True)
        dropped = len([k for k in state if k not in wanted])
        random = hp.get(RANDOM_MARKER) or ckpt.get(RANDOM_MARKER)
        info = {"weights": f"checkpoint {path}" + (f" (RANDOM weights, preset {random})" if random else ""),
                "random": bool(random), "ignored_weights": dropped}
        del ckpt, state
    model.eval()
    info["blocks"] = used
    info["hparams"] = _architecture(hp)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, info


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def validate_bench(cfg: DictConfig) -> None:
    from boltz_cp.cli.predict import validate

    if cfg.model.backend != "cp":
        raise ConfigError("the bench runs the CP model only (model.backend=cp)")
    if cfg.dp != 1:
        raise ConfigError(f"the bench runs one mesh (dp=1), got dp={cfg.dp}")
    validate(cfg)
    if cfg.preset is not None and cfg.checkpoint is not None:
        raise ConfigError("give preset= (random weights) or checkpoint= (a file), not both")
    if cfg.preset is not None:
        from boltz_cp.models.checkpoint import PRESETS

        if cfg.preset not in PRESETS:
            raise ConfigError(f"preset={cfg.preset} is not one of {', '.join(sorted(PRESETS))}")
    for key in ("pairformer", "msa", "template", "confidence", "token_transformer", "atom_encoder", "atom_decoder"):
        value = cfg.blocks[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"blocks.{key} must be a positive integer or null, got {value!r}")


def bench(cfg: DictConfig, input_arg: str) -> dict | None:
    """Run the bench on every rank; returns the report on rank 0 (None elsewhere)."""
    from boltz.data.write.writer import BoltzWriter
    from lightning_fabric.utilities.seed import seed_everything

    from boltz_cp.cli.predict import _Finished
    from boltz_cp.cli.progress import Progress
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import (
        ProcessedDirs,
        batch_to,
        collect_inputs,
        parse_target,
        required_ccd_codes,
        write_processed,
    )
    from boltz_cp.distributed import CPMesh, TokenLayout, init_distributed, shutdown_distributed
    from boltz_cp.models.boltz2 import ModelInputs, gather_outputs
    from boltz_cp.models.checkpoint import default_cache

    validate_bench(cfg)
    set_backend(cfg.kernels.attention)
    files = collect_inputs(Path(input_arg).expanduser())
    if len(files) != 1:
        raise ConfigError(f"the bench takes one input file, got {len(files)} in {input_arg}")
    path = files[0]
    ctx = init_distributed(cfg.timeout_s, cfg.device)
    staging = Path(tempfile.mkdtemp(prefix="boltz_cp_bench_"))
    try:
        mesh = CPMesh.build(cfg.mesh.rows, cfg.mesh.cols, device_type=ctx.device.type)
        rank0 = mesh.is_writer
        log = Progress(cfg.progress and rank0)
        device = ctx.device
        cuda = device.type == "cuda"
        torch.set_grad_enabled(False)
        torch.set_float32_matmul_precision("highest")
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        meter = CudaMeter(device) if cuda else HeapMeter()
        rec = StageRecorder(meter, sync, log=lambda m: log(m))
        cache = Path(cfg.cache).expanduser() if cfg.cache else default_cache()
        mol_dir = cache / "mols"

        log(f"bench {path.name}: mesh {mesh.rows}x{mesh.cols}, device {device}, fp32, "
            f"{torch.get_num_threads()} thread(s) per rank")
        t0, c0 = time.perf_counter(), time.process_time()
        ensure_molecules(mol_dir, required_ccd_codes(path))
        rec.add("residue library (ensure_molecules)", t0, time.perf_counter() - t0, time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        dirs = ProcessedDirs(staging / "processed").make()
        record = write_processed(parse_target(path, mol_dir, cfg.seed), path, dirs, cfg.max_msa_seqs)
        batch = featurize_lean(record, dirs, mol_dir, seed=cfg.seed, method=cfg.method)
        rec.add("featurize (parse + featurize_lean)", t0, time.perf_counter() - t0, time.process_time() - c0)
        n_tokens, n_atoms = int(batch["token_pad_mask"].sum()), int(batch["atom_pad_mask"].sum())
        log(f"{record.id}: {n_tokens} tokens, {n_atoms} atoms")

        t0, c0 = time.perf_counter(), time.process_time()
        model, info = build_model(cfg, cache)
        model.to(device)
        rec.add("build / load model", t0, time.perf_counter() - t0, time.process_time() - c0)
        if info["random"] and rank0:
            log.warn(f"WARNING: {info['weights']}: the predicted structures are not meaningful")
        log(f"model: {info['weights']}; {info['parameters']:,} parameters; blocks "
            + ", ".join(f"{k} {v}" for k, v in info["blocks"].items()))

        args = model.predict_args
        run_kwargs = dict(recycling_steps=args["recycling_steps"], num_sampling_steps=args["sampling_steps"],
                          diffusion_samples=args["diffusion_samples"],
                          max_parallel_samples=args["max_parallel_samples"])
        with meter:
            with rec.stage("cut inputs (per rank)"):
                batch = batch_to(batch, device)
                layout = TokenLayout(batch["token_pad_mask"].shape[1], mesh)
                inputs = ModelInputs.cut(batch, layout)
            if cfg.warmup:
                log("warm-up forward (untimed)")
                seed_everything(cfg.seed, verbose=False)
                with torch.inference_mode():
                    model(inputs, layout, **run_kwargs)  # hooks not yet on: no records
            remove = hook_stages(model, rec)
            try:
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                seed_everything(cfg.seed, verbose=False)
                sync()
                meter.reset()
                rec.ref = base = meter.now()
                cpu0 = time.process_time()
                with torch.inference_mode():
                    rec.begin("forward (whole model)")
                    out = model(inputs, layout, **run_kwargs)
                    rec.end("forward (whole model)")
                cpu_forward = time.process_time() - cpu0
                rec.ref = None
                forward_peak = rec.records[-1]["peak_bytes"] + base
            finally:
                remove()
            with rec.stage("gather outputs to rank 0"), torch.inference_mode():
                keep = {k: v for k, v in out.items() if k not in ("pdistogram", "relative_position_encoding")
                        and (cfg.write_embeddings or k != "z")}
                full = gather_outputs(keep, layout, dst=mesh.writer)
                del out
                pred = None
                if full is not None:
                    full.setdefault("z", None)
                    from boltz.model.models.boltz2 import Boltz2

                    pred = Boltz2.predict_step(_Finished(full, model), batch, 0)
            if cfg.write and rank0:
                with rec.stage("write outputs (rank 0)"):
                    writer = BoltzWriter(data_dir=str(dirs.structures), output_dir=str(staging / "predictions"),
                                         output_format=cfg.output_format, boltz2=True,
                                         write_embeddings=cfg.write_embeddings)
                    writer.write_on_batch_end(None, None, pred, None, batch, 0, 0)
        mine = {
            "rank": mesh.rank,
            "coord": list(mesh.coord),
            "records": rec.records,
            "forward_act_bytes": forward_peak - base,
            "forward_base_bytes": base,
            "abs_peak_bytes": max(meter.max_seen, meter.peak()),
            "rss_peak_bytes": rss_peak(),
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "parameter_bytes": info["parameter_bytes"],
            "forward_cpu_s": cpu_forward,
            "memory_kind": meter.kind,
        }
        every = [None] * mesh.size
        if mesh.size > 1:
            torch.distributed.all_gather_object(every, mine)
        else:
            every = [mine]
        if not rank0:
            return None
        report = {
            "input": str(path), "record": record.id, "n_tokens": n_tokens, "n_atoms": n_atoms,
            "n_padded": layout.n_padded, "mesh": f"{mesh.rows}x{mesh.cols}", "device": str(device),
            "dtype": "float32", "threads_per_rank": torch.get_num_threads(),
            "kernels_attention": cfg.kernels.attention,
            "recycling_steps": args["recycling_steps"], "sampling_steps": args["sampling_steps"],
            "diffusion_samples": args["diffusion_samples"],
            "model": {k: v for k, v in info.items() if k != "hparams"},
            "hparams": info["hparams"],
            "stages": aggregate(every),
            "ranks": [{k: v for k, v in r.items() if k != "records"} for r in every],
        }
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutdown_distributed()


def _architecture(hp: dict) -> dict:
    """The widths and depths the memory model (benchmarks/model.py) needs, from the hparams."""
    pf, tpl, msa = hp.get("pairformer_args") or {}, hp.get("template_args") or {}, hp.get("msa_args") or {}
    sm, conf = hp.get("score_model_args") or {}, (hp.get("confidence_model_args") or {}).get("pairformer_args") or {}
    return {
        "token_s": hp["token_s"], "token_z": hp["token_z"], "atom_s": hp["atom_s"], "atom_z": hp["atom_z"],
        "s_heads": pf.get("num_heads", 16), "tri_heads": pf.get("pairwise_num_heads", 4),
        "tri_width": pf.get("pairwise_head_width", 32), "msa_s": msa.get("msa_s"),
        "template_dim": tpl.get("template_dim") if hp.get("use_templates") else None,
        "token_transformer_heads": sm.get("token_transformer_heads"), "atom_heads": sm.get("atom_encoder_heads"),
        "num_bins": hp.get("num_bins", 64), "pairformer_blocks": pf.get("num_blocks"),
        "msa_blocks": msa.get("msa_blocks"), "template_blocks": tpl.get("template_blocks"),
        "token_transformer_depth": sm.get("token_transformer_depth"),
        "confidence_blocks": conf.get("num_blocks"),
    }


def aggregate(every: list[dict]) -> list[dict]:
    """Per stage (in order of first start on rank 0): calls, seconds (rank 0 and max over
    ranks), peak bytes (max over ranks) and each rank's peak."""
    first_start: dict[str, float] = {}
    table: dict[str, dict] = {}
    for r in every:
        for rec in r["records"]:
            row = table.setdefault(rec["stage"], {"stage": rec["stage"], "depth": rec["depth"],
                                                  "per_rank": {}})
            if r["rank"] == every[0]["rank"] or rec["stage"] not in first_start:
                first_start[rec["stage"]] = min(first_start.get(rec["stage"], rec["start"]), rec["start"])
            mine = row["per_rank"].setdefault(r["rank"], {"calls": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                                          "peak_bytes": None})
            mine["calls"] += 1
            mine["seconds"] += rec["seconds"]
            mine["cpu_seconds"] += rec.get("cpu_seconds") or 0.0
            if rec["peak_bytes"] is not None:
                mine["peak_bytes"] = max(mine["peak_bytes"] or 0, rec["peak_bytes"])
    rows = []
    for name in sorted(first_start, key=lambda k: (first_start[k], -len(k))):
        row = table[name]
        ranks = row["per_rank"]
        first = ranks.get(0) or next(iter(ranks.values()))
        peaks = [v["peak_bytes"] for v in ranks.values() if v["peak_bytes"] is not None]
        rows.append({
            "stage": name, "depth": row["depth"], "calls": first["calls"],
            "seconds_rank0": first["seconds"], "seconds_max": max(v["seconds"] for v in ranks.values()),
            "seconds_per_call": first["seconds"] / max(1, first["calls"]),
            "cpu_seconds_rank0": first["cpu_seconds"],
            "cpu_seconds_max": max(v["cpu_seconds"] for v in ranks.values()),
            "peak_bytes_max": max(peaks) if peaks else None,
            "peak_bytes_per_rank": {str(k): v["peak_bytes"] for k, v in sorted(ranks.items())},
        })
    return rows


def format_report(report: dict) -> str:
    """The two markdown tables and a header."""

    def mib(x):
        return "n/a" if x is None else f"{x / MIB:.1f}"

    m = report["model"]
    lines = [
        f"boltz_cp bench: {report['input']} ({report['n_tokens']} tokens, {report['n_atoms']} atoms, "
        f"padded to {report['n_padded']}), mesh {report['mesh']}, {report['device']}, {report['dtype']}, "
        f"{report['threads_per_rank']} thread(s)/rank",
        f"model: {m['weights']}; {m['parameters']:,} parameters ({m['parameter_bytes'] / MIB:.0f} MiB per rank); "
        "blocks " + ", ".join(f"{k} {v}" for k, v in m["blocks"].items()),
        f"run: recycling_steps {report['recycling_steps']}, sampling_steps {report['sampling_steps']}, "
        f"diffusion_samples {report['diffusion_samples']}, "
        f"kernels.attention {report.get('kernels_attention', 'torch')}",
        "",
        "| stage | calls | wall s (rank 0) | wall s per call | wall s (max over ranks) | CPU s (max over ranks) "
        "| peak MiB (max over ranks) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["stages"]:
        indent = "&nbsp;&nbsp;" * row["depth"]
        lines.append(f"| {indent}{row['stage']} | {row['calls']} | {row['seconds_rank0']:.2f} | "
                     f"{row['seconds_per_call']:.3f} | {row['seconds_max']:.2f} | {row['cpu_seconds_max']:.2f} | "
                     f"{mib(row['peak_bytes_max'])} |")
    kind = report["ranks"][0]["memory_kind"]
    lines += [
        "",
        f"peak MiB: {kind} above its value when the forward began (stages inside the forward) or when "
        "the stage began (others).",
        "",
        "| rank | tile (r, c) | forward peak MiB | forward start MiB | process peak MiB | RSS peak MiB | "
        "CUDA max alloc. MiB | weights MiB | forward CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["ranks"]:
        lines.append(f"| {r['rank']} | ({r['coord'][0]}, {r['coord'][1]}) | {mib(r['forward_act_bytes'])} | "
                     f"{mib(r['forward_base_bytes'])} | {mib(r['abs_peak_bytes'])} | {mib(r['rss_peak_bytes'])} | "
                     f"{mib(r['cuda_max_allocated_bytes'])} | {mib(r['parameter_bytes'])} | "
                     f"{r['forward_cpu_s']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""


def main(argv: list[str] | None = None) -> int:
    from boltz_cp.cli.config import compose_config, config_help

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or any(a in ("-h", "--help") for a in args):
            print(USAGE)
            if args:
                print("Settings (defaults shown):\n")
                print(config_help(compose_config([a for a in args if "=" in a], name="bench")))
            return 0 if args else 2
        show_cfg = "--cfg" in args
        if show_cfg:
            i = args.index("--cfg")
            if args[i + 1: i + 2] != ["job"]:
                raise ConfigError("only `--cfg job` is supported")
            del args[i: i + 2]
        positional = [a for a in args if "=" not in a]
        cfg = compose_config([a for a in args if "=" in a], name="bench")
        if show_cfg:
            print(config_help(cfg))
            return 0
        if len(positional) != 1:
            raise ConfigError(f"expected exactly one INPUT file, got {positional or 'none'}\n{USAGE}")
        report = bench(cfg, positional[0])
        if report is not None:
            print(format_report(report), flush=True)
            print("BENCH_JSON " + json.dumps(report), flush=True)
            if cfg.json:
                Path(cfg.json).expanduser().write_text(json.dumps(report, indent=1))
        return 0
    except BoltzCPError as e:
        print(f"boltz_cp.bench: error: {_rank_prefix()}{e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"boltz_cp.bench: {_rank_prefix()}interrupted", file=sys.stderr, flush=True)
        return 130
