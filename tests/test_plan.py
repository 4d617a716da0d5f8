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
from boltz_cp.plan.memory import stage_memory, transpose_staging, triangle_mult_terms
from boltz_cp.plan.model import Dtypes

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
    """R x C holds more than the 1x1/P ideal (padding, transpose buffers) but less
    than the square mesh of fewer ranks. (1x4 vs 2x2 is not asserted: since SUMMA reuses one
    receive buffer and trimul frees a|b on R x C, 1x4 can hold less than Cannon's 2x2.)"""
    one = _peak(512, 1, 1)
    sq, rect = _peak(512, 2, 2), _peak(512, 2, 3)
    assert one / 6 < rect < sq
    # the rectangular terms are there, and only on R x C
    dt = Dtypes.of("fp32")
    # the SUMMA loop no longer exceeds the tri-mul's other phases (measured: 7 tiles, as 1x1)
    def tiles(g):
        return sum(b for _, b in triangle_mult_terms(g, 128, dt)) / (g.pairs * 128 * 4)
    assert tiles(geometry(512, 2, 3)) == pytest.approx(tiles(geometry(512, 1, 1)))
    assert any("R x C transpose" in w for w, _ in stage_memory(geometry(512, 2, 3))["distogram"])
    assert not any("R x C transpose" in w for w, _ in stage_memory(geometry(512, 2, 2))["distogram"])
    # staging of the generic transpose, worst rank (2x3 measured 1.67 tiles at N=192)
    assert transpose_staging(2, 3) == pytest.approx(5 / 3)
    assert transpose_staging(1, 2) == pytest.approx(0.5)


def test_fused_kernel_drops_the_score_block():
    # tri-att's own peak: under bf16 at 3,605 on 2x2 the stage peak is the triangle multiplication's
    from boltz_cp.plan.memory import triangle_attention_terms
    from boltz_cp.plan.model import Dtypes
    g, dt = geometry(3605, 2, 2), Dtypes.of("bf16")
    torch_terms = triangle_attention_terms(g, BOLTZ2.token_z, BOLTZ2, dt, MemOptions(kernels="torch"))
    fused_terms = triangle_attention_terms(g, BOLTZ2.token_z, BOLTZ2, dt)
    assert any("score block" in w for w, _ in torch_terms)
    assert not any("score block" in w for w, _ in fused_terms)
    assert sum(b for _, b in fused_terms) < sum(b for _, b in torch_terms)
    assert _peak(3605, 2, 2, "bf16", kernels="fused") <= _peak(3605, 2, 2, "bf16", kernels="torch")


def test_defaults_are_the_code_as_built():
    """predict runs fused attention (kernels.attention=auto) and bf16 Cannon operands under
    bf16-mixed: the model's defaults and `plan_kernels` say the same."""
    from omegaconf import OmegaConf

    from boltz_cp.cli.plan import plan_kernels
    from boltz_cp.plan.memory import AS_BUILT

    assert AS_BUILT.kernels == "fused" and AS_BUILT.cannon_act_dtype and AS_BUILT.label() == "as implemented"
    assert MemOptions(kernels="torch").label() == "kernels=torch"
    # callers release block inputs and relpos is rebuilt (layers/pairformer.py consume=, Boltz2CP):
    # 3 fp32 tiles fewer at the MSA module's peak (1 block, no recycle): z_init, relpos, z after OPM
    assert AS_BUILT.release_inputs and AS_BUILT.rebuild_relpos
    g, tile = geometry(1000, 1, 1), 1000 * 1000 * BOLTZ2.token_z * 4
    run = BOLTZ2.with_run(recycling_steps=0, msa_blocks=1)
    kept = sum(b for _, b in stage_memory(g, run, "fp32", MemOptions(release_inputs=False,
                                                                     rebuild_relpos=False))["MSA module"])
    assert kept - sum(b for _, b in stage_memory(g, run, "fp32")["MSA module"]) == pytest.approx(3 * tile)
    for attention, kind in (("auto", "fused"), ("fused", "fused"), ("cueq", "fused"), ("torch", "torch")):
        assert plan_kernels(OmegaConf.create({"kernels": {"attention": attention}})) == kind
    assert plan_mesh(PI4KA, 2, 2).kernels == "fused"
    # bf16 Cannon blocks hold less than fp32 ones at bf16-mixed; at fp32 the option changes nothing
    assert _peak(3605, 2, 2, "bf16") <= _peak(3605, 2, 2, "bf16", cannon_act_dtype=False)
    assert _peak(3605, 2, 2, "fp32") == _peak(3605, 2, 2, "fp32", cannon_act_dtype=False)


def test_samples_at_once_follow_max_parallel_samples():
    """Upstream chunks the samples as torch.arange(S).chunk(S % mps + 1): the first chunk is
    denoised at once and sets the step's memory; s/sample still divides by S."""
    import torch
    from omegaconf import OmegaConf

    from boltz_cp.cli.plan import run_hyper
    from boltz_cp.plan.model import samples_at_once

    for s in range(1, 13):
        for mps in (None, 1, 2, 3, 5, 8):
            assert samples_at_once(s, mps) == len(torch.arange(s).chunk(s % (mps or s) + 1)[0]), (s, mps)
    cfg = OmegaConf.create({"recycling_steps": 3, "sampling_steps": 200, "diffusion_samples": 6,
                            "max_parallel_samples": 5})
    hp = run_hyper(cfg)
    assert (hp.samples, hp.samples_at_once) == (6, 3)
    g = geometry(3605, 2, 2)
    sampling = {k: memory_summary(g, BOLTZ2.with_run(samples=s, samples_at_once=a), "bf16")["stages"]["sampling"]
                for k, (s, a) in {"25/5": (25, 5), "5/5": (5, 5), "5/1": (5, 1)}.items()}
    assert sampling["25/5"] == sampling["5/5"] > sampling["5/1"]


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


SERVER_SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


@pytest.fixture()
def server_input(tmp_path):
    """A protein chain without an MSA: use_msa_server=true would fill it."""
    path = tmp_path / "needs_server.yaml"
    path.write_text(f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {SERVER_SEQ}\n")
    (tmp_path / "empty.yaml").write_text(path.read_text() + "      msa: empty\n")  # single sequence
    return path


class _FetchedMsas:
    """What predict's ServerMsas hands to the check: attach() points the chain at fetched MSAs
    (here 7 distinct rows, as the server's CSV)."""

    def attach(self, path, target, folder):
        from boltz_cp.data.msa_server import attach_msas

        rows = [SERVER_SEQ] + [SERVER_SEQ[:i] + "W" + SERVER_SEQ[i + 1:] for i in range(1, 7)]
        attach_msas(target, {"0": "key,sequence\n" + "".join(f",{r}\n" for r in rows)}, folder)


def test_server_msas_are_sized(server_input, boltz_cache):
    """predict sizes a server-MSA input from the MSAs it fetched; `plan` (nothing fetched)
    assumes max_msa_seqs rows for the chains the server would fill, and says so."""
    import io

    from boltz_cp.cli.config import compose_config
    from boltz_cp.cli.plan import plan, read_sizes
    from boltz_cp.errors import InputError
    from boltz_cp.plan.inputs import input_size

    mols = boltz_cache / "mols"
    with pytest.raises(InputError, match="no MSA"):
        input_size(server_input, mols)
    fetched = input_size(server_input, mols, msas=_FetchedMsas())
    assert (fetched.msa_depth, fetched.msa_assumed) == (7, ())
    cfg = compose_config([f"cache={boltz_cache}", "use_msa_server=true", "max_msa_seqs=4096"], name="plan")
    [assumed] = read_sizes(cfg, [server_input], mols)
    assert (assumed.tokens, assumed.msa_depth, assumed.msa_assumed) == (fetched.tokens, 4096, ("A",))
    out = io.StringIO()
    assert plan(cfg, str(server_input), out=out) == 0
    assert "MSA depth 4,096 sequences" in out.getvalue() and "ASSUMED max_msa_seqs=4,096 deep for chain(s) A" \
        in out.getvalue(), out.getvalue()


def test_memory_settings_are_validated_up_front(server_input, capsys):
    """predict checks gpu_memory_gb even with check_memory=false; plan checks precision and
    kernels.attention with predict's choices."""
    from boltz_cp.cli.main import main

    for args in (["predict", str(server_input), "gpu_memory_gb=-1", "check_memory=false"],
                 ["predict", str(server_input), "check_memory=maybe"],
                 ["plan", str(server_input), "kernels.attention=bogus"],
                 ["plan", str(server_input), "precision=fp16"],
                 ["plan", str(server_input), "gpu_memory_gb=0"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("boltz_cp: error:") and len(err.strip().splitlines()) == 1, err
        assert args[-2 if "check_memory=false" in args else -1].split("=")[0] in err, err


def _check_with_rank_budget(path: str, mols: str, gbs: list):
    """check_fits on a 1x1 mesh with this rank's gpu_memory_gb: the error or 'fits'."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from boltz_cp.cli.config import compose_config
    from boltz_cp.cli.plan import check_fits
    from boltz_cp.errors import ConfigError

    cfg = compose_config([f"gpu_memory_gb={gbs[dist.get_rank()]}", "model.backend=cp", "precision=fp32"],
                         name="predict")
    try:
        check_fits(cfg, [Path(path)], Path(mols), torch.device("cpu"), SimpleNamespace(rows=1, cols=1))
    except ConfigError as e:
        return str(e)
    return "fits"


def test_ranks_agree_on_the_budget(run_on_world, server_input, boltz_cache):
    """One rank with less memory than the others: every rank refuses (gloo, 4 ranks)."""
    gbs = [1, 1000, 1000, 1000]  # 1 GB: below weights + allowance
    got = run_on_world(_check_with_rank_budget, 4, str(server_input.with_name("empty.yaml")),
                       str(boltz_cache / "mols"), gbs, timeout=120)
    assert all("needs a predicted" in g and "1.0 GB" in g for g in got), got


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
    here = plan_mesh(size, rows, cols, precision="fp32", kernels="fused").total
    bigger = plan_mesh(size, 4, 4, precision="fp32", kernels="fused").total
    budget = (here + bigger) / 2
    best = smallest_fit(size, budget, precision="fp32", kernels="fused")
    assert best is not None and best.geometry.ranks > rows * cols
    return f"{budget / GB:.4f}", best.geometry.label


def _refusal_args(path, tmp_path, cache, gb, *extra, backend="cp"):
    # the checkpoint does not exist: a run that got to loading weights would say so instead
    return ["predict", str(path), f"out_dir={tmp_path / 'out'}", f"cache={cache}",
            f"checkpoint={tmp_path / 'absent.ckpt'}", "recycling_steps=0", "sampling_steps=2",
            f"gpu_memory_gb={gb}", f"model.backend={backend}", *extra]


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
    # model.backend=reference (upstream's model, not modelled): no check, one line says so
    r = subprocess.run([sys.executable, "-m", "boltz_cp",
                        *_refusal_args(path, tmp_path, boltz_cache, gb, backend="reference")],
                       capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert r.returncode == 2 and "absent.ckpt" in r.stderr and "needs a predicted" not in r.stderr, r.stderr[-2000:]
    assert "memory check skipped: model.backend=reference" in r.stderr + r.stdout, r.stderr[-2000:]


def test_predict_refuses_before_weights_on_2x2_torchrun(tmp_path, refuse_input, boltz_cache):
    path, size = refuse_input
    gb, best = _refusal_budget(size, 2, 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "boltz_cp",
           *_refusal_args(path, tmp_path, boltz_cache, gb, "mesh=2x2")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       cwd=REPO)
    assert r.returncode != 0
    _assert_refused(r.stderr, size, "2x2", best, 4)
