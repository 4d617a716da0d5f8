"""Which meshes a run fits on: per-rank peak memory, time per sample and ring traffic of one
input on every mesh a GPU count allows, with the fit against a GPU's memory.

A mesh fits when the predicted activation peak + the weights (every rank holds them) + the
runtime allowance (`RUNTIME_ALLOWANCE_BYTES`: CUDA context, NCCL buffers, allocator
fragmentation; an assumption) is at most the GPU's memory. Every figure is PREDICTED.
"""

from __future__ import annotations

from dataclasses import dataclass

from boltz_cp.plan.memory import MemOptions, memory_summary
from boltz_cp.plan.model import BOLTZ2, GB, Geometry, Hyper, geometry
from boltz_cp.plan.timing import h100_variant, ring_traffic, sample_time

RUNTIME_ALLOWANCE_BYTES = 3e9
MAX_ASPECT = 4  # rectangular meshes listed up to C = 4 R (longer ones only add ring steps)
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class RunSize:
    """An input as the planner sees it: tokens, atoms, MSA rows the model will use."""

    name: str
    tokens: int
    atoms: int
    msa_depth: int  # sequences in the input's deepest MSA (1: single sequence)
    msa_rows: int  # rows the MSA module sees after max_msa_seqs / subsampling
    msa_assumed: tuple[str, ...] = ()  # chains whose MSA the server would give, assumed max_msa_seqs deep


@dataclass(frozen=True)
class MeshPlan:
    """The predictions of one input on one R x C mesh (per rank)."""

    size: RunSize
    geometry: Geometry
    precision: str
    kernels: str
    activations: float
    weights: float
    peak_stage: str
    seconds_per_sample: float
    ring_bytes: float

    @property
    def total(self) -> float:
        """Activations + weights + the runtime allowance, bytes per rank."""
        return self.activations + self.weights + RUNTIME_ALLOWANCE_BYTES

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= gpu_bytes


def meshes(gpus: int, aspect: int = MAX_ASPECT) -> list[tuple[int, int]]:
    """R x C meshes (R <= C <= aspect R) of every size that divides `gpus`, smallest first."""
    out = []
    for p in range(1, gpus + 1):
        if gpus % p:
            continue
        out += [(r, p // r) for r in range(1, p + 1) if p % r == 0 and r <= p // r <= max(aspect * r, 2)]
    return out


def plan_mesh(size: RunSize, rows: int, cols: int, hp: Hyper = BOLTZ2, precision: str = "bf16",
              kernels: str = "fused", gpus_per_node: int = GPUS_PER_NODE) -> MeshPlan:
    """Predictions for `size` on an R x C mesh; a mesh of more ranks than a node spans nodes
    (one tile row per node: ring_i and transposes on InfiniBand)."""
    hp = hp.with_run(msa_rows=size.msa_rows, atoms_per_token=size.atoms / max(size.tokens, 1))
    g = geometry(size.tokens, rows, cols, hp, atoms=size.atoms)
    mem = memory_summary(g, hp, precision, MemOptions(kernels="torch" if kernels == "torch" else "fused"))
    mach = h100_variant("torch" if kernels == "torch" else "fused", inter_node=rows * cols > gpus_per_node)
    seconds, _ = sample_time(g, hp, mach, precision)
    return MeshPlan(size, g, precision, kernels, mem["activations"], mem["weights"], mem["peak_stage"], seconds,
                    ring_traffic(g, hp, precision))


def plan_all(sizes: list[RunSize], gpus: int, hp: Hyper = BOLTZ2, precision: str = "bf16", kernels: str = "fused",
             gpus_per_node: int = GPUS_PER_NODE) -> dict[tuple[int, int], list[MeshPlan]]:
    """Every input on every mesh of `meshes(gpus)`."""
    return {(r, c): [plan_mesh(s, r, c, hp, precision, kernels, gpus_per_node) for s in sizes]
            for r, c in meshes(gpus)}


def split_dp(plans: list[MeshPlan], dp: int) -> list[list[MeshPlan]]:
    """Inputs over dp meshes, largest first, each to the mesh with the least predicted work."""
    shares: list[list[MeshPlan]] = [[] for _ in range(dp)]
    for p in sorted(plans, key=lambda p: -p.seconds_per_sample):
        min(shares, key=lambda s: sum(x.seconds_per_sample for x in s)).append(p)
    return shares


@dataclass(frozen=True)
class Option:
    """dp meshes of R x C (dp * R * C <= gpus) running all inputs."""

    rows: int
    cols: int
    dp: int
    worst: MeshPlan  # the input with the largest per-rank peak
    job_seconds: float  # per sample: the busiest mesh's inputs one after another

    def fits(self, gpu_bytes: float) -> bool:
        return self.worst.fits(gpu_bytes)

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.cols}" + (f" dp={self.dp}" if self.dp > 1 else "")


def options(sizes: list[RunSize], gpus: int, hp: Hyper = BOLTZ2, precision: str = "bf16",
            kernels: str = "fused", gpus_per_node: int = GPUS_PER_NODE) -> list[Option]:
    """One mesh per mesh shape (dp = 1), and for several inputs dp meshes of the shapes that
    divide the GPUs evenly (dp <= inputs)."""
    out = []
    for (r, c), plans in plan_all(sizes, gpus, hp, precision, kernels, gpus_per_node).items():
        worst = max(plans, key=lambda p: p.total)
        for dp in range(1, min(len(sizes), gpus // (r * c)) + 1):
            if dp > 1 and r * c * dp != gpus:
                continue
            busiest = max(sum(p.seconds_per_sample for p in share) for share in split_dp(plans, dp))
            out.append(Option(r, c, dp, worst, busiest))
    return out


TIME_TIE = 1.05  # predicted job times within 5% count as equal (the model is not that exact)


def recommend(opts: list[Option], gpu_bytes: float) -> Option | None:
    """The fitting option with the shortest job; options within TIME_TIE of it tie and go to
    fewer GPUs, then the lower per-rank peak. None if nothing fits."""
    fitting = [o for o in opts if o.fits(gpu_bytes)]
    if not fitting:
        return None
    fastest = min(o.job_seconds for o in fitting)
    near = [o for o in fitting if o.job_seconds <= fastest * TIME_TIE]
    return min(near, key=lambda o: (o.dp * o.rows * o.cols, o.worst.total, o.job_seconds))


def smallest_fit(size: RunSize, gpu_bytes: float, hp: Hyper = BOLTZ2, precision: str = "bf16",
                 kernels: str = "fused", max_gpus: int = 1024) -> MeshPlan | None:
    """The mesh of fewest ranks (then the most square; C <= MAX_ASPECT R) on which `size` fits,
    up to max_gpus."""
    for p in range(1, max_gpus + 1):
        shapes = sorted(((r, p // r) for r in range(1, p + 1) if p % r == 0 and r <= p // r <= MAX_ASPECT * r),
                        key=lambda rc: rc[1] - rc[0])
        for r, c in shapes:
            plan = plan_mesh(size, r, c, hp, precision, kernels)
            if plan.fits(gpu_bytes):
                return plan
    return None


def msa_rows(depth: int, max_msa_seqs: int, subsample_msa: bool, num_subsampled_msa: int) -> int:
    """MSA rows the model uses: the featurizer keeps max_msa_seqs, the MSA module subsamples."""
    rows = min(max(depth, 1), max_msa_seqs)
    return min(rows, num_subsampled_msa) if subsample_msa else rows


def _gb(x: float) -> str:
    return f"{x / GB:,.0f}" if x >= 1000 * GB else f"{x / GB:.1f}"


def format_table(opts: list[Option], gpu_bytes: float | None, best: Option | None) -> str:
    """A markdown table, one row per option."""
    head = ("| mesh | GPUs | tile | peak GB/rank (act + weights + allowance) | peak stage | s/sample | "
            "ring GB/rank | fits |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for o in opts:
        w, g = o.worst, o.worst.geometry
        fit = "-" if gpu_bytes is None else ("yes" if o.fits(gpu_bytes) else "no")
        if best is not None and o == best:
            fit += " <- recommended"
        lines.append(
            f"| {o.label} | {o.dp * o.rows * o.cols} | {g.n}x{g.m} | {_gb(w.total)} ({_gb(w.activations)} + "
            f"{_gb(w.weights)} + {_gb(RUNTIME_ALLOWANCE_BYTES)}) | {w.peak_stage} | {o.job_seconds:,.0f} | "
            f"{_gb(w.ring_bytes)} | {fit} |")
    return "\n".join(lines)
