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
then cli/run.py's `cut_inputs`, `forward_cp` seeded by `seed`, `finish_prediction` gathering to
rank 0, upstream's writer). The meters and the stage recorder are boltz_cp/measure.py's.
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
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from boltz_cp.errors import BoltzCPError, ConfigError
from boltz_cp.kernels import set_backend
from boltz_cp.measure import MIB, CudaMeter, HeapMeter, StageRecorder, aggregate, hook_stages, rss_peak
from boltz_cp.models.presets import BLOCK_KEYS, PRESETS, apply_blocks

USAGE = """\
usage: python -m boltz_cp.bench INPUT [key=value ...] [--cfg job] [--help]
       torchrun --nproc-per-node K -m boltz_cp.bench INPUT mesh=RxC [key=value ...]

Runs the CP model on one Boltz-2 .yaml/.fasta input and prints per-stage wall time and
per-rank peak memory. Random weights without a checkpoint file: preset=full (Boltz-2's widths)
or preset=tiny; fewer blocks: blocks.pairformer=K (also msa, template, confidence,
token_transformer, atom_encoder, atom_decoder); shorter runs: recycling_steps=0 sampling_steps=2.
"""


def build_model(cfg: DictConfig, cache: Path) -> tuple[Any, dict]:
    """The CP model the settings describe -> (model, info). preset=: random weights (randomize_,
    seeded by weights_seed); else the checkpoint, memory-mapped, first K blocks of each stack.
    The inference-time knobs are set by the loader's own merge (`inference_hparams`)."""
    from boltz_cp.cli.run import model_settings
    from boltz_cp.models.boltz2 import Boltz2CP
    from boltz_cp.models.checkpoint import (
        RANDOM_MARKER,
        default_checkpoint_path,
        inference_hparams,
        plain_hparams,
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
        model = Boltz2CP(inference_hparams(hp, **model_settings(cfg)))
        from boltz_cp.parity.reference import randomize_

        randomize_(model, torch.Generator().manual_seed(cfg.weights_seed))
        info = {"weights": f"preset {cfg.preset} (RANDOM weights, seed {cfg.weights_seed})", "random": True}
    else:
        path = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else default_checkpoint_path(cache)
        ckpt = read_checkpoint(path)  # memory-mapped where the file allows it
        hp = plain_hparams(ckpt["hyper_parameters"])
        used = apply_blocks(hp, blocks, limit_to_existing=True)
        model = Boltz2CP(inference_hparams(hp, **model_settings(cfg)))
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
    if cfg.use_msa_server:
        raise ConfigError("the bench does not query an MSA server (use_msa_server=false): give the MSAs in the input")
    validate(cfg)
    if cfg.preset is not None and cfg.checkpoint is not None:
        raise ConfigError("give preset= (random weights) or checkpoint= (a file), not both")
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise ConfigError(f"preset={cfg.preset} is not one of {', '.join(sorted(PRESETS))}")
    for key in BLOCK_KEYS:
        value = cfg.blocks[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"blocks.{key} must be a positive integer or null, got {value!r}")


def bench(cfg: DictConfig, input_arg: str) -> dict | None:
    """Run the bench on every rank; returns the report on rank 0 (None elsewhere).

    What differs from `boltz_cp predict` (cli/predict.py) on one input: the model (random
    presets, fewer blocks), fp32 always, an optional untimed warm-up forward, every step of
    cli/run.py's `run_cp` bracketed as a stage, and the report gathered to rank 0."""
    from boltz.data.write.writer import BoltzWriter

    from boltz_cp.cli.progress import Progress
    from boltz_cp.cli.run import cut_inputs, finish_prediction, forward_cp
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, collect_inputs, parse_target, required_ccd_codes, write_processed
    from boltz_cp.distributed import CPMesh, init_distributed, shutdown_distributed
    from boltz_cp.models.checkpoint import default_cache

    validate_bench(cfg)
    set_backend(cfg.kernels.attention)
    files = collect_inputs(Path(input_arg).expanduser())
    if len(files) != 1:
        raise ConfigError(f"the bench takes one input file, got {len(files)} in {input_arg}")
    path = files[0]
    ctx = init_distributed(cfg.timeout_s, cfg.device, cfg.dist_backend)
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
        with meter:
            with rec.stage("cut inputs (per rank)"):
                batch, layout, inputs, affinity = cut_inputs(model, batch, mesh, device)
            if cfg.warmup:
                log("warm-up forward (untimed)")  # hooks not yet on: no records
                forward_cp(model, inputs, layout, cfg.seed, "fp32", device, affinity)
            remove = hook_stages(model, rec)
            try:
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                sync()
                meter.reset()
                rec.ref = base = meter.now()
                cpu0 = time.process_time()
                with rec.stage("forward (whole model)"):
                    out = forward_cp(model, inputs, layout, cfg.seed, "fp32", device, affinity)
                cpu_forward = time.process_time() - cpu0
                rec.ref = None
                forward_peak = rec.records[-1]["peak_bytes"] + base
            finally:
                remove()
            with rec.stage("gather outputs to rank 0"):
                pred = finish_prediction(model, out, batch, layout, mesh, cfg.write_embeddings)
                del out
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
