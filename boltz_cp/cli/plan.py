"""`boltz_cp plan INPUT [gpus=G] [gpu_memory_gb=M] [nodes=K]`, and predict's memory check.

The plan reads and tokenizes the input(s) with the prediction's data path (no model, no
weights), then prints, for every mesh the GPUs allow, the PREDICTED per-rank peak of
`boltz_cp.plan` (activations + weights + the runtime allowance), the stage that sets it, the time
per sample at assumed H100 rates and the ring traffic per rank, marks what fits in M GB and
recommends one. `check_fits` is predict's guard: before any weights download or load, a run the
plan says cannot fit stops with one line on every rank (the ranks agree on the budget first).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from boltz_cp.errors import ConfigError, InputError, RankFailure

DEFAULT_GPU_GB = 80  # an H100's memory, when the plan is not told gpu_memory_gb


def plan_precision(precision: str, device_type: str = "cuda") -> str:
    """The model's precision class of a `precision=` setting (auto: bf16-mixed on CUDA, as predict)."""
    if precision == "auto":
        precision = "bf16-mixed" if device_type == "cuda" else "fp32"
    return "bf16" if precision == "bf16-mixed" else precision


def _precision_label(precision: str) -> str:
    return "bf16-mixed" if precision == "bf16" else precision


def plan_kernels(cfg: DictConfig) -> str:
    """fused or torch (score blocks materialised) from `kernels.attention` (auto / fused / cueq:
    a fused kernel, as predict runs them)."""
    attention = OmegaConf.select(cfg, "kernels.attention", default="auto")
    return "torch" if attention == "torch" else "fused"


def run_hyper(cfg: DictConfig):
    """Boltz-2 as released with this run's steps and samples (and how many upstream's sampler
    denoises at once under max_parallel_samples)."""
    from boltz_cp.plan import BOLTZ2
    from boltz_cp.plan.model import samples_at_once

    return BOLTZ2.with_run(recycling_steps=cfg.recycling_steps, sampling_steps=cfg.sampling_steps,
                           samples=cfg.diffusion_samples,
                           samples_at_once=samples_at_once(cfg.diffusion_samples, cfg.get("max_parallel_samples")))


def _mol_dir(cfg: DictConfig) -> Path:
    from boltz_cp.models.checkpoint import default_cache

    return (Path(cfg.cache).expanduser() if cfg.cache else default_cache()) / "mols"


def read_sizes(cfg: DictConfig, files: list[Path], mol_dir: Path, skip_bad: bool = False, msas=None) -> list:
    """RunSize of each input (an unreadable one raises InputError, or is left out with skip_bad).
    msas: predict's fetched server MSAs; without them, use_msa_server=true assumes max_msa_seqs
    rows for the chains the server would fill."""
    from boltz_cp.plan.inputs import input_size

    assume = bool(cfg.get("use_msa_server")) and msas is None
    sizes = []
    for path in files:
        try:
            sizes.append(input_size(path, mol_dir, cfg.seed, cfg.max_msa_seqs, cfg.subsample_msa,
                                    cfg.num_subsampled_msa, msas=msas, assume_server=assume))
        except InputError:
            if not skip_bad:
                raise
    return sizes


def _gpu_bytes(cfg: DictConfig, device=None) -> tuple[float | None, str]:
    """The memory a rank may use and where the figure comes from; None: no limit known."""
    gb = cfg.get("gpu_memory_gb")
    if gb is not None:
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb <= 0:
            raise ConfigError(f"gpu_memory_gb must be a positive number, got {gb!r}")
        return float(gb) * 1e9, f"gpu_memory_gb={gb:g}"
    if device is not None and device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free memory of {device}"
    return None, ""


def validate_memory_settings(cfg: DictConfig) -> None:
    """check_memory and gpu_memory_gb, in predict's validate (before any process group)."""
    check = cfg.get("check_memory", True)
    if not isinstance(check, bool):
        raise ConfigError(f"check_memory must be true or false, got {check!r}")
    _gpu_bytes(cfg)


def _agree_min(value: float, device, timeout_s: float) -> float:
    """The smallest `value` over the world (one all-reduce MIN of one float), so every rank
    decides alike; one process: the value."""
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    on = device if str(dist.get_backend()) == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=on)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # a peer died or did not join
        raise RankFailure(f"the ranks could not agree on the memory budget ({str(e).splitlines()[0]})") from None
    return float(t.item())


def check_fits(cfg: DictConfig, files: list[Path], mol_dir: Path, device, mesh, msas=None, log=None) -> None:
    """predict's guard, on every rank of the world (a collective) before any weights download or
    load: ConfigError naming the first input the plan says cannot fit this mesh in the memory
    (an explicit gpu_memory_gb=, else on CUDA the smallest free memory of any rank's device; CPU
    without it: no check). check_memory=false skips it; so does model.backend=reference, whose
    memory (upstream's model) the plan does not model. msas: the server MSAs predict fetched."""
    if not cfg.get("check_memory", True) or not files:
        return
    if cfg.model.backend == "reference":
        if log is not None:
            log("memory check skipped: model.backend=reference (upstream's model; the plan models the cp model)")
        return
    budget, source = _gpu_bytes(cfg, device)
    agreed = _agree_min(float("inf") if budget is None else budget, device, cfg.timeout_s)
    if agreed == float("inf"):
        return
    if cfg.get("gpu_memory_gb") is None and agreed < float("inf") and agreed != budget:
        source = "the smallest free memory of the job's devices"
    budget = agreed
    from boltz_cp.plan import GB, plan_mesh, smallest_fit

    hp, kernels = run_hyper(cfg), plan_kernels(cfg)
    precision = plan_precision(cfg.precision, device.type)
    largest = None
    for size in read_sizes(cfg, files, mol_dir, skip_bad=True, msas=msas):  # a bad input fails later, as usual
        plan = plan_mesh(size, mesh.rows, mesh.cols, hp, precision, kernels)
        if plan.fits(budget):
            largest = plan if largest is None or plan.total > largest.total else largest
            continue
        best = smallest_fit(size, budget, hp, precision, kernels)
        where = (f"smallest mesh that fits: {best.geometry.label} ({best.total / GB:.1f} GB per rank)" if best
                 else "no mesh fits (weights and allowance alone exceed it)")
        raise ConfigError(
            f"{size.name} ({size.tokens:,} tokens, {size.atoms:,} atoms) needs a predicted {plan.total / GB:.1f} GB "
            f"per rank on mesh {mesh.rows}x{mesh.cols} ({precision}, peak in {plan.peak_stage}) but {source} gives "
            f"{budget / GB:.1f} GB; {where}; check_memory=false runs it anyway")
    if log is not None and largest is not None:
        log(f"memory check: {largest.size.name} ({largest.size.tokens:,} tokens, MSA depth {largest.size.msa_depth:,}) "
            f"needs a predicted {largest.total / GB:.1f} GB per rank of {budget / GB:.1f} GB ({source})")


def _describe(cfg: DictConfig, precision: str, kernels: str, hp) -> str:
    from boltz_cp.plan import parameter_count

    return (f"run: Boltz-2 as released ({hp.pairformer_blocks} pairformer blocks, {parameter_count(hp):,} "
            f"parameters), precision {_precision_label(precision)}, {hp.recycling_steps} recycles, {hp.sampling_steps} sampling "
            f"steps, {hp.samples} sample(s) ({hp.samples_at_once} denoised at once), attention kernels {kernels}"
            + (" (no score blocks)" if kernels == "fused" else " (score blocks materialised)"))


def plan(cfg: DictConfig, input_arg: str, out=sys.stdout) -> int:
    """Print the plan of INPUT (a file or a folder of inputs); 0 when some mesh fits."""
    from boltz_cp.data.inputs import collect_inputs
    from boltz_cp.plan import GB, RUNTIME_ALLOWANCE_BYTES, options, recommend, weights_bytes

    from boltz_cp.cli.run import PRECISIONS
    from boltz_cp.kernels import BACKENDS as ATTENTION_BACKENDS

    for key, allowed in (("precision", PRECISIONS), ("kernels.attention", ATTENTION_BACKENDS)):
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} is not one of {', '.join(map(str, allowed))}")
    validate_memory_settings(cfg)
    gpus, nodes = cfg.gpus, cfg.nodes
    for key, value in (("gpus", gpus), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if gpus % nodes:
        raise ConfigError(f"gpus={gpus} is not a multiple of nodes={nodes}")
    budget, source = _gpu_bytes(cfg)
    if budget is None:
        budget, source = DEFAULT_GPU_GB * 1e9, f"{DEFAULT_GPU_GB} GB (an H100; set gpu_memory_gb=)"
    precision, kernels, hp = plan_precision(cfg.precision), plan_kernels(cfg), run_hyper(cfg)

    files = collect_inputs(Path(input_arg).expanduser())
    sizes = read_sizes(cfg, files, _mol_dir(cfg))
    for s in sizes:
        depth = "single sequence" if s.msa_depth <= 1 else f"{s.msa_depth:,} sequences"
        print(f"{s.name}: {s.tokens:,} tokens, {s.atoms:,} atoms, MSA depth {depth} "
              f"({s.msa_rows:,} row(s) in the MSA module)"
              + (f"; ASSUMED max_msa_seqs={cfg.max_msa_seqs:,} deep for chain(s) {', '.join(s.msa_assumed)} "
                 "(use_msa_server=true: the server's MSAs are not fetched here)" if s.msa_assumed else ""), file=out)
    print(_describe(cfg, precision, kernels, hp), file=out)
    print(f"GPUs: {gpus} on {nodes} node(s); memory per GPU: {source}; per rank the plan adds weights "
          f"{weights_bytes(hp) / GB:.2f} GB and an allowance of {RUNTIME_ALLOWANCE_BYTES / GB:.0f} GB (CUDA "
          "context, NCCL buffers, fragmentation: assumed)", file=out)
    opts = options(sizes, gpus, hp, precision, kernels, gpus_per_node=gpus // nodes)
    best = recommend(opts, budget)
    print("\nPREDICTED (analytic model, boltz_cp/plan: memory inventory calibrated on CPU runs, H100 rates "
          "assumed; not measured)" + ("; per row the largest input's memory, and s/sample of the whole job "
                                      "(each mesh's inputs one after another)" if len(sizes) > 1 else ""), file=out)
    from boltz_cp.plan.planner import format_table

    print(format_table(opts, budget, best), file=out)
    if best is None:
        print(f"\nnothing fits in {budget / GB:.0f} GB per GPU with {gpus} GPU(s)", file=out)
        return 1
    print(f"\nrecommended: mesh={best.rows}x{best.cols}" + (f" dp={best.dp}" if best.dp > 1 else "")
          + f" ({best.dp * best.rows * best.cols} GPUs): {best.worst.total / GB:.1f} GB per rank, "
          f"~{best.job_seconds:,.0f} s per sample", file=out)
    return 0
