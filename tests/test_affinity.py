"""The affinity property: a second pass with the affinity checkpoint on the predicted structure
cropped around the binder, under both backends.

Tier: no process group (the `tiny-affinity` preset loads strictly in upstream and in Boltz2CP;
the affinity crop's lean features equal upstream's dense ones); gloo CPU 1x1, 2x2 and 3x3 in float64
(parity case `model_affinity`: upstream `Boltz2.forward` of an affinity model
vs Boltz2CP, the six affinity outputs, coordinates and ipTM to round-off); end-to-end CLI
(subprocess and torchrun):
`boltz_cp predict` on a protein-ligand YAML with model.backend=reference (1x1) and
model.backend=cp on 1x1, 2x2 and 3x3 writes the same affinity_<id>.json (within 1e-4); a missing
affinity checkpoint and a failure inside the affinity pass leave no output behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity_helpers import assert_parity

REPO = Path(__file__).resolve().parent.parent
ENV_VARS = {"OMP_NUM_THREADS": "1"}

PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLI"  # 30 residues; with EDO's 4 atoms: 34 tokens
YAML = f"""\
version: 1
sequences:
  - protein:
      id: A
      sequence: {PROTEIN}
      msa: empty
  - ligand:
      id: L
      ccd: EDO
properties:
  - affinity:
      binder: L
"""
# Structure pass: cheap (its top model is only the affinity pass's input); affinity pass: 10 steps
# (coordinates in range, so the heads' distance bins matter) and 2 samples (ipTM picks one).
ARGS = ("recycling_steps=0", "sampling_steps=10", "diffusion_samples=1", "sampling_steps_affinity=10",
        "diffusion_samples_affinity=2", "affinity_mw_correction=true", "seed=3", "precision=fp32")
KEYS = ("affinity_pred_value", "affinity_probability_binary", "affinity_pred_value1",
        "affinity_probability_binary1", "affinity_pred_value2", "affinity_probability_binary2")


def _run(args: list[str], timeout: float, torchrun: int = 0, python: str | None = None) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
               "-m", "boltz_cp", *args]
    elif python is not None:
        cmd = [sys.executable, "-c", python, *args]
    else:
        cmd = [sys.executable, "-m", "boltz_cp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **ENV_VARS})


@pytest.fixture(scope="module")
def affinity_ckpt(tmp_path_factory) -> Path:
    from boltz_cp.models.checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-aff.ckpt", preset="tiny-affinity", seed=1)


@pytest.fixture
def affinity_input(tmp_path) -> Path:
    path = tmp_path / "pl.yaml"
    path.write_text(YAML)
    return path


def _args(inp: Path, out: Path, cache: Path, ckpt: Path, aff: Path, *extra: str) -> list[str]:
    return ["predict", str(inp), f"out_dir={out}", f"cache={cache}", f"checkpoint={ckpt}",
            f"affinity_checkpoint={aff}", *ARGS, *extra]


# -- no process group --------------------------------------------------------------------------


def test_tiny_affinity_preset_loads_strictly(affinity_ckpt):
    """Upstream's own loader (strict, no overrides) and ours accept the preset; Boltz2CP has
    exactly upstream's parameter names, affinity heads included."""
    from boltz.model.models.boltz2 import Boltz2

    from boltz_cp.models.boltz2 import Boltz2CP
    from boltz_cp.models.checkpoint import load_boltz2

    upstream = Boltz2.load_from_checkpoint(affinity_ckpt, strict=True, map_location="cpu")
    assert upstream.affinity_prediction and upstream.affinity_ensemble and upstream.confidence_prediction
    predict = {"recycling_steps": 0, "sampling_steps": 2, "diffusion_samples": 1, "max_parallel_samples": 1}
    ours, info = load_boltz2(affinity_ckpt, predict_args=predict, affinity_mw_correction=False)
    assert info["random_preset"] == "tiny-affinity" and ours.affinity_mw_correction is False
    cp, _ = load_boltz2(affinity_ckpt, predict_args=predict, cp=True)
    assert isinstance(cp, Boltz2CP) and cp.affinity_mw_correction is True  # the checkpoint's
    assert sorted(cp.state_dict()) == sorted(upstream.state_dict())
    assert any(k.startswith("affinity_module2.") for k in cp.state_dict())


def test_affinity_crop_lean_features_equal_upstreams():
    """featurize_affinity(lean=True) gives upstream's affinity features (compute_affinity=True,
    override_method "other", the crop), every shared key equal in value and dtype."""
    from boltz_cp.parity.cases.affinity import affinity_features

    feats = affinity_features()
    dense, lean = feats["dense"], feats["lean"]
    shared = set(dense) & set(lean)
    assert {"profile_affinity", "deletion_mean_affinity", "affinity_mw", "affinity_token_mask"} <= shared
    for key in sorted(shared):
        assert dense[key].dtype == lean[key].dtype and torch.equal(dense[key], lean[key]), key
    assert not torch.equal(dense["profile"], dense["profile_affinity"])  # the MSA has rows beyond the query
    assert int(dense["method_feature"].unique()) == 4  # "other"
    assert bool(dense["affinity_token_mask"].any())


# -- gloo CPU, float64 -------------------------------------------------------------------------


# 2x2 / 3x3 take about 25 s / 50 s here, mostly the serial oracle on every rank.
@pytest.mark.parametrize("side", [1, 2, 3])
def test_model_affinity_parity_float64(run_on_mesh, side):
    line = assert_parity(run_on_mesh, "model_affinity", side, 0, timeout=300)
    print(line)


# -- end to end --------------------------------------------------------------------------------


def _affinity(out: Path, name: str = "pl") -> dict:
    return json.loads((out / f"boltz_results_{name}" / "predictions" / name / f"affinity_{name}.json").read_text())


def test_affinity_json_same_on_every_backend_and_mesh(tmp_path, affinity_input, boltz_cache, tiny_ckpt,
                                                      affinity_ckpt):
    """Reference (1x1) and cp on 1x1 / 2x2 / 3x3 write the same affinity_<id>.json (1e-4), with the
    ensemble's values and upstream's molecular-weight correction of their mean."""
    ref = tmp_path / "ref"
    r = _run(_args(affinity_input, ref, boltz_cache, tiny_ckpt, affinity_ckpt, "model.backend=reference"),
             timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny-affinity" in r.stderr and "affinity: 34 tokens cropped around the binder" in r.stderr
    want = _affinity(ref)
    assert set(want) == set(KEYS)
    pred = ref / "boltz_results_pl" / "predictions" / "pl"
    assert (pred / "pre_affinity_pl.npz").exists() and (pred / "pl_model_0.cif").exists()
    record = json.loads((ref / "boltz_results_pl" / "processed" / "records" / "pl.json").read_text())
    mean = (want["affinity_pred_value1"] + want["affinity_pred_value2"]) / 2
    corrected = 1.03525938 * mean - 0.59992683 * record["affinity"]["mw"] ** 0.3 + 2.83288489
    assert abs(want["affinity_pred_value"] - corrected) < 1e-5, (want, corrected)

    for side in (1, 2, 3):
        out = tmp_path / f"cp{side}"
        args = _args(affinity_input, out, boltz_cache, tiny_ckpt, affinity_ckpt, "model.backend=cp",
                     f"mesh={side}x{side}")
        r = _run(args, timeout=300 if side == 1 else 600, torchrun=side * side if side > 1 else 0)
        assert r.returncode == 0, r.stderr[-3000:]
        got = _affinity(out)
        assert set(got) == set(KEYS)
        diffs = {k: abs(got[k] - want[k]) for k in KEYS}
        print(f"mesh {side}x{side}: max |cp - reference| = {max(diffs.values()):.2e}")
        assert max(diffs.values()) <= 1e-4, diffs
        assert not list(out.rglob(".staging-*"))


def test_missing_affinity_checkpoint_stops_before_any_work(tmp_path, affinity_input, boltz_cache, tiny_ckpt):
    missing = tmp_path / "nowhere" / "boltz2_aff.ckpt"
    out = tmp_path / "out"
    r = _run(_args(affinity_input, out, boltz_cache, tiny_ckpt, missing), timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for hint in (f"Boltz-2 affinity checkpoint not found: {missing}", "boltz predict", "boltz2_aff.ckpt",
                 "affinity_checkpoint=PATH", "--preset tiny-affinity"):
        assert hint in r.stderr, (hint, r.stderr[-2000:])
    assert "loading checkpoint" not in r.stderr  # before the structure model loads
    assert not (out / "boltz_results_pl" / "predictions").exists()
    # a structure checkpoint in its place is refused before any prediction, too
    r = _run(_args(affinity_input, out, boltz_cache, tiny_ckpt, tiny_ckpt), timeout=120)
    assert r.returncode == 2 and f"{tiny_ckpt} is not a Boltz-2 affinity checkpoint" in r.stderr, r.stderr[-2000:]
    assert not (out / "boltz_results_pl" / "predictions").exists()


# Fails inside the affinity pass, after the structures and a partial json are in the staging folder.
_FAIL_IN_AFFINITY_WRITER = """\
import sys
from boltz.data.write import writer

def write_half_then_fail(self, trainer, module, prediction, indices, batch, batch_idx, loader_idx):
    (self.output_dir / batch["record"][0].id / "affinity_pl.json").write_text("{")
    raise OSError("disk full (injected)")

writer.BoltzAffinityWriter.write_on_batch_end = write_half_then_fail
from boltz_cp.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_failed_affinity_pass_leaves_no_output(tmp_path, affinity_input, boltz_cache, tiny_ckpt, affinity_ckpt):
    out = tmp_path / "out"
    r = _run(_args(affinity_input, out, boltz_cache, tiny_ckpt, affinity_ckpt, "sampling_steps_affinity=2",
                   "diffusion_samples_affinity=1"), timeout=300, python=_FAIL_IN_AFFINITY_WRITER)
    assert r.returncode != 0 and "disk full (injected)" in r.stderr, r.stderr[-3000:]
    preds = out / "boltz_results_pl" / "predictions"
    assert not preds.exists() or not any(preds.iterdir())
    assert not list(out.rglob(".staging-*"))
