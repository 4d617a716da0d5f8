"""The `boltz_cp` command line. Tier: no process group (config), subprocess and torchrun (CLI).

Multi-process cases run under torchrun on CPU; every one has a deadline, so a hang fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from boltz_cp.cli.config import compose_config
from boltz_cp.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def _torchrun(nproc: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return _run(cmd + ["-m", "boltz_cp", *args], timeout=timeout)


# The settings a user can give; the CLI grows deliberately: update this list with the README.
EXPECTED_KEYS = {
    "mesh", "out_dir", "cache", "checkpoint", "override", "recycling_steps", "sampling_steps",
    "diffusion_samples", "max_parallel_samples", "step_scale", "seed", "method", "use_potentials",
    "subsample_msa", "num_subsampled_msa", "max_msa_seqs", "precision", "device", "dist_backend", "output_format",
    "write_full_pae", "write_full_pde", "write_embeddings", "timeout_s", "progress", "model",
    "affinity_checkpoint", "sampling_steps_affinity", "diffusion_samples_affinity", "affinity_mw_correction",
    "dp", "use_msa_server", "msa_server_url", "msa_pairing_strategy", "msa_server_username",
    "msa_server_password", "api_key_header", "api_key_value", "msa_server_timeout_s",
    "gpu_memory_gb", "check_memory", "kernels",
    "plots", "weights_url",
}


def test_config_keys_snapshot():
    cfg = compose_config([])
    assert set(cfg.keys()) == EXPECTED_KEYS
    assert set(cfg.mesh.keys()) == {"rows", "cols"}
    assert set(cfg.model.keys()) == {"backend"}


@pytest.mark.parametrize("mesh,rows,cols", [("1x1", 1, 1), ("2x2", 2, 2), ("3x3", 3, 3), ("4x4", 4, 4), ("8x8", 8, 8), ("2x3", 2, 3)])
def test_mesh_overrides(mesh, rows, cols):
    cfg = compose_config([f"mesh={mesh}"])
    assert (cfg.mesh.rows, cfg.mesh.cols) == (rows, cols)
    cfg = compose_config(["mesh=2x2", "mesh.rows=1"])
    assert (cfg.mesh.rows, cfg.mesh.cols) == (1, 2)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="mesh"):
        compose_config(["mesh=huge"])
    with pytest.raises(ConfigError, match="bad setting"):
        compose_config(["no_such_key=1"])
    with pytest.raises(ConfigError, match="key=value"):
        compose_config(["justaword"])


def test_help_and_cfg():
    r = _run([sys.executable, "-m", "boltz_cp", "predict", "--help"])
    assert r.returncode == 0, r.stderr
    assert "usage: boltz_cp predict" in r.stdout and "recycling_steps: 3" in r.stdout
    r = _run([sys.executable, "-m", "boltz_cp", "predict", "x.yaml", "mesh=2x2", "--cfg", "job"])
    assert r.returncode == 0 and "rows: 2" in r.stdout
    r = _run([sys.executable, "-m", "boltz_cp", "fold", "x.yaml"])
    assert r.returncode == 2 and "unknown command 'fold'" in r.stderr


def _predict_args(inp: Path, out: Path, cache: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "predict", str(inp), f"out_dir={out}", f"cache={cache}", f"checkpoint={ckpt}",
        "recycling_steps=0", "sampling_steps=2", *extra,
    ]


def test_bad_input_cli(tmp_path, boltz_cache, tiny_ckpt):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsequences:\n  - ligand: {id: L, ccd: ZZZZQ}\n")
    r = _run([sys.executable, "-m", "boltz_cp", *_predict_args(bad, tmp_path / "out", boltz_cache, tiny_ckpt)])
    assert r.returncode == 2, r.stderr
    assert "ZZZZQ" in r.stderr and "Traceback" not in r.stderr
    preds = tmp_path / "out" / "boltz_results_bad" / "predictions"
    assert not preds.exists() or not any(preds.iterdir())
    assert not list((tmp_path / "out").rglob(".staging-*"))


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_bad_checkpoint_cli(kind, tmp_path, small_input, boltz_cache):
    ckpt = tmp_path / "model.ckpt"
    if kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    r = _run([sys.executable, "-m", "boltz_cp", *_predict_args(small_input, tmp_path / "out", boltz_cache, ckpt)])
    assert r.returncode == 2, r.stderr
    assert str(ckpt) in r.stderr and "Traceback" not in r.stderr


def _assert_ranks_stop_with(r: subprocess.CompletedProcess, message: str, nproc: int) -> None:
    """Every rank that reports says `message`, with its rank, and no rank has a traceback. Not every
    rank need report: torchrun's agent stops the remaining workers (SIGTERM) as soon as the first
    one exits non-zero, and under load a slower rank is still importing torch then. A rank that the
    agent stops before it reached the check says so in its own one line."""
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("boltz_cp: error:")]
    assert lines, r.stderr[-3000:]
    assert any(message in line for line in lines), lines
    assert all(message in line or "stopped by SIGTERM" in line for line in lines), lines
    ranks = [line.split("[rank ", 1)[1].split("/", 1)[0] for line in lines]
    assert len(set(ranks)) == len(ranks) and set(ranks) <= {str(k) for k in range(nproc)}, lines
    # torchrun's agent prints its own traceback (ChildFailedError); none may come from boltz_cp.
    ours = re.compile(r'File ".*boltz_cp/(cli|data|distributed|layers|models|modules)/')
    assert not [line for line in r.stderr.splitlines() if ours.search(line)], r.stderr[-3000:]


def test_torchrun_reference_needs_1x1(tmp_path):
    r = _torchrun(4, ["predict", "examples/multichain.yaml", "mesh=2x2", "model.backend=reference",
                      f"out_dir={tmp_path}"], timeout=90)
    _assert_ranks_stop_with(r, "model.backend=reference runs upstream's serial Boltz-2 on a 1x1 mesh only", 4)


def test_torchrun_mesh_mismatch(tmp_path):
    r = _torchrun(4, ["predict", "examples/multichain.yaml", "mesh=3x3", f"out_dir={tmp_path}"], timeout=90)
    _assert_ranks_stop_with(r, "mesh 3x3 needs 9 processes but the world size is 4", 4)


def test_predict_end_to_end(tmp_path, small_input, boltz_cache, tiny_ckpt):
    """A tiny-checkpoint prediction writes Boltz-2's layout and says the weights are random."""
    out = tmp_path / "out"
    r = _run([sys.executable, "-m", "boltz_cp",
              *_predict_args(small_input, out, boltz_cache, tiny_ckpt, "diffusion_samples=2", "output_format=pdb")],
             timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "trunk: recycle 1/1" in r.stderr
    pred = out / "boltz_results_small" / "predictions" / "small"
    names = sorted(p.name for p in pred.iterdir())
    for k in (0, 1):
        for f in (f"small_model_{k}.pdb", f"confidence_small_model_{k}.json", f"plddt_small_model_{k}.npz",
                  f"pde_small_model_{k}.npz"):
            assert f in names, names
    for k in (0, 1):  # plots=true by default
        for f in (f"pae_small_model_{k}.png", f"plddt_small_model_{k}.png"):
            assert (pred / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    assert r.stderr.rstrip().splitlines()[-1].endswith("PAE and pLDDT plots (PNG) next to each model in "
                                                       f"{out / 'boltz_results_small' / 'predictions'}/<id>")
    assert (out / "boltz_results_small" / "boltz_cp_config.yaml").exists()
    assert (out / "boltz_results_small" / "processed" / "records" / "small.json").exists()
    assert not list(out.rglob(".staging-*"))
    # a second run without override skips; the outputs stay
    r = _run([sys.executable, "-m", "boltz_cp", *_predict_args(small_input, out, boltz_cache, tiny_ckpt)])
    assert r.returncode == 0 and "skipping" in r.stderr


def test_directory_with_a_bad_input(tmp_path, small_input, boltz_cache, tiny_ckpt):
    """The good input is predicted, the bad one is named, the exit status is non-zero."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "good.yaml").write_text(small_input.read_text())
    (inputs / "broken.fasta").write_text(">A|protein|empty\nMKT\n>B|peptide\nMK\n")
    out = tmp_path / "out"
    r = _run([sys.executable, "-m", "boltz_cp", *_predict_args(inputs, out, boltz_cache, tiny_ckpt,
                                                               "write_full_pae=false", "write_full_pde=false",
                                                               "plots=false")], timeout=300)
    assert r.returncode == 2, r.stderr
    assert "1 of 2 inputs failed" in r.stderr and "broken.fasta: unknown entity type 'peptide'" in r.stderr
    preds = out / "boltz_results_inputs" / "predictions"
    assert sorted(p.name for p in preds.iterdir()) == ["good"]
    assert (preds / "good" / "good_model_0.cif").exists()
    written = {p.name.split("_")[0] for p in (preds / "good").iterdir()}
    assert {"plddt", "confidence"} <= written and not written & {"pae", "pde"}, written  # matrices off
    assert not list(preds.rglob("*.png"))  # plots=false


# -- model.backend=cp end to end --------------------------------------------------------------

CP_ARGS = ("recycling_steps=1", "sampling_steps=10", "diffusion_samples=2", "seed=5", "precision=fp32")


def _prediction(out: Path, name: str = "small", count: int = 2) -> dict:
    """Coordinates of every model and its confidence values, from the written files."""
    import gemmi
    import numpy as np

    pred = out / f"boltz_results_{name}" / "predictions" / name
    models = {}
    for k in range(count):
        st = gemmi.read_structure(str(pred / f"{name}_model_{k}.cif"))
        xyz = np.array([a.pos.tolist() for ch in st[0] for res in ch for a in res])
        conf = json.loads((pred / f"confidence_{name}_model_{k}.json").read_text())
        arrays = {f: np.load(pred / f"{f}_{name}_model_{k}.npz") for f in ("plddt", "pae", "pde")}
        models[k] = (xyz, conf, {f: a[a.files[0]] for f, a in arrays.items()})
    return models


def _assert_same_prediction(got: dict, want: dict) -> None:
    """Issue bar: coordinates within 1e-3 A RMSD, confidence values within 1e-4."""
    import numpy as np

    for k, (xyz, conf, arrays) in want.items():
        g_xyz, g_conf, g_arrays = got[k]
        rmsd = float(np.sqrt(((g_xyz - xyz) ** 2).sum(-1).mean()))
        assert rmsd <= 1e-3, f"model {k}: RMSD {rmsd:.2e} A"
        for key, value in conf.items():
            if isinstance(value, float):
                assert abs(g_conf[key] - value) <= 1e-4, (k, key, g_conf[key], value)
        for f, a in arrays.items():
            assert np.abs(g_arrays[f] - a).max() <= 1e-4, (k, f)


def _assert_cp_equals_reference(tmp_path: Path, inp: Path, cache: Path, ckpt: Path, *extra: str,
                                meshes=((1, 1), (2, 2), (3, 3))) -> None:
    """Reference backend once, then the cp backend on each mesh: the same files within the bar."""
    name = inp.stem
    ref_out = tmp_path / "ref"
    r = _run([sys.executable, "-m", "boltz_cp", *_predict_args(inp, ref_out, cache, ckpt, *CP_ARGS, *extra,
                                                               "model.backend=reference")], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = _prediction(ref_out, name)
    for rows, cols in meshes:
        out = tmp_path / f"cp{rows}x{cols}"
        args = _predict_args(inp, out, cache, ckpt, *CP_ARGS, *extra, "model.backend=cp", f"mesh={rows}x{cols}")
        r = (_run([sys.executable, "-m", "boltz_cp", *args], timeout=300) if rows * cols == 1
             else _torchrun(rows * cols, args, timeout=600))
        assert r.returncode == 0, r.stderr[-3000:]
        _assert_same_prediction(_prediction(out, name), want)
        assert not list(out.rglob(".staging-*"))


def test_cp_backend_equals_reference_on_1x1_2x2_3x3(tmp_path, small_input, boltz_cache, tiny_ckpt):
    """The same seed gives the same structures and confidences on every mesh and backend."""
    _assert_cp_equals_reference(tmp_path, small_input, boltz_cache, tiny_ckpt)


@pytest.mark.parametrize("meshes", [((2, 3),), pytest.param(((1, 2), (2, 1), (2, 4)), marks=pytest.mark.slow)],
                         ids=["2x3", "1x2-2x1-2x4"])
def test_cp_backend_equals_reference_on_rectangular_meshes(tmp_path, small_input, boltz_cache, tiny_ckpt, meshes):
    """Any R x C mesh folds the same structure: 2x3 (6 ranks) in CI; 1x2, 2x1 and 2x4 (8 ranks)
    on demand (-m slow)."""
    _assert_cp_equals_reference(tmp_path, small_input, boltz_cache, tiny_ckpt, meshes=meshes)


def test_cp_backend_bf16_mixed(tmp_path, small_input, boltz_cache, tiny_ckpt):
    """precision=bf16-mixed under CP (fp32 weights, bf16 autocast, upstream's inference precision):
    a 1x2 run writes finite structures and confidences, and they are not the fp32 run's (the
    autocast took effect). Closeness to the serial model in bf16 is the parity tool's verdict
    (tests/test_parity_bf16.py): sampling amplifies bf16 round-off too much for a file-level bar."""
    out = {}
    for precision in ("bf16-mixed", "fp32"):
        out[precision] = tmp_path / precision
        args = _predict_args(small_input, out[precision], boltz_cache, tiny_ckpt, *CP_ARGS[:-1],
                             f"precision={precision}", "model.backend=cp", "mesh=1x2")
        r = _torchrun(2, args, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    import numpy as np

    got, fp32 = _prediction(out["bf16-mixed"]), _prediction(out["fp32"])
    for k in got:
        assert np.isfinite(got[k][0]).all() and 0 <= got[k][1]["confidence_score"] <= 1
        assert np.abs(got[k][0] - fp32[k][0]).max() > 1e-3
    assert "precision: bf16-mixed" in (out["bf16-mixed"] / "boltz_results_small" / "boltz_cp_config.yaml").read_text()


def test_cp_backend_with_potentials_equals_reference(tmp_path, small_input, boltz_cache, tiny_ckpt):
    """use_potentials=true (fk steering, physical guidance) and a forced pocket (contact guidance):
    the steering potentials act under CP exactly as in the serial model. On a 2x3 mesh: the
    potentials parity case covers 1x1, 2x2 and 3x3 in float64 (tests/test_parity_model.py)."""
    forced = tmp_path / "forced.yaml"
    forced.write_text(small_input.read_text() + "constraints:\n  - pocket:\n      binder: D\n"
                      "      contacts: [[A, 2]]\n      max_distance: 6.0\n      force: true\n")
    _assert_cp_equals_reference(tmp_path, forced, boltz_cache, tiny_ckpt, "use_potentials=true", meshes=((2, 3),))


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_full_preset_cp_equals_reference(tmp_path, small_input, boltz_cache):
    """The `full` preset (Boltz-2's architecture: 64 pairformer blocks, 24-layer token transformer,
    8-block confidence pairformer; random weights): cp on 1x1 and 2x2 equals the reference backend.
    3x3 is left out here: 9 ranks would each hold the 2 GB of weights."""
    from boltz_cp.models.checkpoint import make_random_checkpoint

    ckpt = make_random_checkpoint(tmp_path / "full.ckpt", preset="full", seed=0)
    args = ("recycling_steps=1", "sampling_steps=10", "diffusion_samples=1", "seed=5", "precision=fp32")
    r = _run([sys.executable, "-m", "boltz_cp", *_predict_args(small_input, tmp_path / "ref", boltz_cache, ckpt,
                                                               *args, "model.backend=reference")], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    want = {0: _prediction(tmp_path / "ref", count=1)[0]}
    for side in (1, 2):
        out = tmp_path / f"cp{side}"
        cp_args = _predict_args(small_input, out, boltz_cache, ckpt, *args, "model.backend=cp", f"mesh={side}x{side}")
        r = (_run([sys.executable, "-m", "boltz_cp", *cp_args], timeout=1800) if side == 1
             else _torchrun(side * side, cp_args, timeout=3600))
        assert r.returncode == 0, r.stderr[-3000:]
        _assert_same_prediction(_prediction(out, count=1), want)


@pytest.mark.parametrize("override, message", [
    ("sampling_steps=1", "sampling_steps must be at least 2"),
    ("diffusion_samples=0", "diffusion_samples must be at least 1"),
    ("model.backend=nope", "model.backend=nope is not one of auto, reference, cp"),
    ("kernels.attention=flash", "kernels.attention=flash is not one of auto, torch, fused, cueq"),
])
def test_bad_settings_stop_before_any_work(tmp_path, small_input, override, message):
    r = _run([sys.executable, "-m", "boltz_cp", "predict", str(small_input), f"out_dir={tmp_path / 'out'}", override])
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
