"""The pre-flight planner (boltz_cp.plan) and `boltz_cp plan`. Tier: no process group (model),
end-to-end CLI (plan on the 3,605-token benchmark input; no weights)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from boltz_cp.plan import (
    BOLTZ2, GB, RUNTIME_ALLOWANCE_BYTES, MemOptions, RunSize, geometry, memory_summary, meshes, options,
    parameter_count, plan_mesh, recommend, smallest_fit)
from boltz_cp.plan.memory import stage_memory

REPO = Path(__file__).resolve().parent.parent
PI4KA = RunSize("pi4ka_complex_3605.yaml", 3605, 30351, 1, 1)
SYN30K = RunSize("synthetic_30000.yaml", 30000, 250415, 1, 1)


def _peak(n, rows, cols, precision="fp32", **opts):
    return memory_summary(geometry(n, rows, cols), BOLTZ2, precision, MemOptions(**opts))["activations"]


def test_constants_are_read_from_the_code():
    from boltz_cp.layers import transition, triangular_attention
    from boltz_cp.models.presets import PRESETS
    from boltz_cp.plan import memory

    assert memory.SCORE_BLOCK_PER_TILE is triangular_attention.SCORE_BLOCK_PER_TILE
    assert memory.TRANSITION_CHUNK == transition.CHUNK_HIDDEN
    full = PRESETS["full"]
    assert (BOLTZ2.token_z, BOLTZ2.token_s, BOLTZ2.pairformer_blocks) == (
        full["token_z"], full["token_s"], full["pairformer_args"]["num_blocks"])
    assert BOLTZ2.token_transformer_depth == full["score_model_args"]["token_transformer_depth"]
    assert parameter_count(BOLTZ2) == 506_724_992  # the released checkpoint's count


def test_memory_falls_with_mesh_size_and_grows_with_tokens():
    for precision in ("fp32", "bf16"):
        peaks = [_peak(3605, p, p, precision) for p in (1, 2, 4, 8)]
        assert peaks == sorted(peaks, reverse=True), peaks
        # O(N^2 / P): quadrupling the ranks cuts the peak to within 10% of a quarter
        assert peaks[1] / peaks[2] == pytest.approx(4, rel=0.1)
        sizes = [_peak(n, 2, 3, precision) for n in (500, 1000, 2000, 4000)]
        assert sizes == sorted(sizes)
    assert [m for m in meshes(4)] == [(1, 1), (1, 2), (1, 4), (2, 2)]
    assert (8, 8) in meshes(64) and (4, 16) in meshes(64) and (1, 64) not in meshes(64)


def test_rectangular_against_square():
    """R x C holds more than the 1x1/P ideal (SUMMA's own blocks, transpose buffers) but less
    than the square mesh of fewer ranks; 1x4 holds more than 2x2 (same ranks, long tiles)."""
    one = _peak(512, 1, 1)
    sq, rect = _peak(512, 2, 2), _peak(512, 2, 3)
    assert one / 6 < rect < sq
    assert _peak(3605, 1, 4) > _peak(3605, 2, 2)
    # the rectangular terms are there, and only on R x C
    names = {w for w, _ in stage_memory(geometry(512, 2, 3))["pairformer"]}
    assert any("own k|v|mask" in w for w in names) or any("SUMMA loop" in w for w in names)
    assert not any("SUMMA" in w for w, _ in stage_memory(geometry(512, 2, 2))["pairformer"])


def test_fused_kernel_drops_the_score_block():
    g = geometry(3605, 2, 2)
    torch_terms = dict(stage_memory(g, BOLTZ2, "bf16")["pairformer"])
    fused_terms = dict(stage_memory(g, BOLTZ2, "bf16", MemOptions(kernels="fused"))["pairformer"])
    assert any("score block" in w for w in torch_terms)
    assert not any("score block" in w for w in fused_terms)
    assert _peak(3605, 2, 2, "bf16", kernels="fused") < _peak(3605, 2, 2, "bf16")


def test_fit_decisions_at_the_issue_cases():
    """3,605 tokens on 2x2 bf16 fits an 80 GB H100 (and the time is finite); at fp32 the 30,000-token
    input misses 80 GB on 8x8; nothing fits below the weights + allowance."""
    p = plan_mesh(PI4KA, 2, 2, precision="bf16")
    assert p.total == pytest.approx(p.activations + p.weights + RUNTIME_ALLOWANCE_BYTES)
    assert p.fits(80 * GB) and not p.fits(p.total - 1)
    assert 0 < p.seconds_per_sample < 1e5 and p.ring_bytes > 0
    assert not plan_mesh(SYN30K, 8, 8, precision="fp32").fits(80 * GB)
    assert plan_mesh(PI4KA, 1, 1, precision="fp32").ring_bytes == 0
    best = smallest_fit(PI4KA, 40 * GB, precision="bf16")
    assert best is not None and best.fits(40 * GB) and best.geometry.ranks > 1
    assert not plan_mesh(PI4KA, 1, 1, precision="bf16").fits(40 * GB)
    assert smallest_fit(PI4KA, 4 * GB, precision="bf16", max_gpus=16) is None  # weights + allowance: 5 GB


def test_recommendation_and_dp():
    small = RunSize("s.yaml", 800, 6700, 1, 1)
    opts = options([PI4KA, small], 4, precision="bf16")
    labels = {o.label for o in opts}
    assert {"1x1", "2x2", "1x2 dp=2"} <= labels and "1x1 dp=4" not in labels, labels  # dp <= inputs
    best = recommend(opts, 80 * GB)
    assert best is not None and best.fits(80 * GB)
    assert recommend(opts, 1 * GB) is None


def test_plan_cli_on_the_3605_input(boltz_cache):
    """`boltz_cp plan` tokenizes the input (no checkpoint in the cache) and prints a table with a pick."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "boltz_cp", "plan", "benchmarks/inputs/pi4ka_complex_3605.yaml",
                        "gpus=4", "gpu_memory_gb=80", f"cache={boltz_cache}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "3,605 tokens, 30,351 atoms, MSA depth single sequence" in out
    assert "PREDICTED" in out and "| 2x2 | 4 | 1804x1804 |" in out and "| 1x4 |" in out
    assert "recommended: mesh=" in out
    assert not list(boltz_cache.glob("*.ckpt"))


# -- predict refuses what the plan says cannot fit (end-to-end CLI, torchrun on CPU) -----------

REFUSE_TOKENS = 400


@pytest.fixture(scope="module")
def refuse_input(tmp_path_factory, boltz_cache):
    """A 400-token two-chain protein and its size as the plan reads it."""
    from boltz_cp.data.synthetic import synthetic_proteins_yaml
    from boltz_cp.plan.inputs import input_size

    path = tmp_path_factory.mktemp("refuse") / "two_chains.yaml"
    path.write_text(synthetic_proteins_yaml(REFUSE_TOKENS, chains=2))
    return path, input_size(path, boltz_cache / "mols")


def _refusal_budget(size, rows, cols):
    """gpu_memory_gb between the mesh's predicted total (fp32 on CPU) and a 4x4 mesh's: refused
    on RxC, and the smallest mesh that fits is named."""
    here = plan_mesh(size, rows, cols, precision="fp32").total
    bigger = plan_mesh(size, 4, 4, precision="fp32").total
    budget = (here + bigger) / 2
    best = smallest_fit(size, budget, precision="fp32")
    assert best is not None and best.geometry.ranks > rows * cols
    return f"{budget / GB:.4f}", best.geometry.label


def _refusal_args(path, tmp_path, cache, gb, *extra):
    # the checkpoint does not exist: a run that got to loading weights would say so instead
    return ["predict", str(path), f"out_dir={tmp_path / 'out'}", f"cache={cache}",
            f"checkpoint={tmp_path / 'absent.ckpt'}", "recycling_steps=0", "sampling_steps=2",
            f"gpu_memory_gb={gb}", *extra]


def _assert_refused(stderr: str, size, mesh: str, best: str, ranks: int) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("boltz_cp: error:")]
    refusals = [line for line in lines if "needs a predicted" in line]
    assert refusals, stderr[-3000:]
    for line in refusals:
        assert f"{size.name} ({size.tokens:,} tokens" in line and f"on mesh {mesh}" in line, line
        assert f"smallest mesh that fits: {best}" in line and "check_memory=false" in line, line
    # every rank that reports says the same (a rank torchrun stops first may say so instead)
    assert all("needs a predicted" in line or "stopped by SIGTERM" in line for line in lines), lines
    if ranks > 1:
        assert len({line.split("[rank ", 1)[1].split("/", 1)[0] for line in refusals}) == len(refusals)
    assert "absent.ckpt" not in stderr
    # torchrun's agent prints its own traceback (ChildFailedError); none may come from boltz_cp
    assert not re.search(r'File ".*boltz_cp/', stderr), stderr[-3000:]


def test_predict_refuses_before_weights_on_1x1(tmp_path, refuse_input, boltz_cache):
    path, size = refuse_input
    gb, best = _refusal_budget(size, 1, 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "boltz_cp", *_refusal_args(path, tmp_path, boltz_cache, gb)],
                       capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_refused(r.stderr, size, "1x1", best, 1)
    assert not list((tmp_path / "out").rglob("*.cif"))
    # check_memory=false goes on to the weights (here: the missing checkpoint)
    r = subprocess.run([sys.executable, "-m", "boltz_cp",
                        *_refusal_args(path, tmp_path, boltz_cache, gb, "check_memory=false")],
                       capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert r.returncode == 2 and "absent.ckpt" in r.stderr and "needs a predicted" not in r.stderr, r.stderr[-2000:]


def test_predict_refuses_before_weights_on_2x2_torchrun(tmp_path, refuse_input, boltz_cache):
    path, size = refuse_input
    gb, best = _refusal_budget(size, 2, 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "boltz_cp",
           *_refusal_args(path, tmp_path, boltz_cache, gb, "mesh=2x2")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       cwd=REPO)
    assert r.returncode != 0
    _assert_refused(r.stderr, size, "2x2", best, 4)
