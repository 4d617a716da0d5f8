"""`python -m boltz_cp.bench` and the analytic model benchmarks/model.py.

Tier: no process group (settings, block overrides, the model's functions) and subprocess CLI on
a 1x1 mesh (one run of the bench on the tiny preset, with a deadline). No timing assertions.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from boltz_cp.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _load_model():
    spec = importlib.util.spec_from_file_location("boltz_cp_bench_model", REPO / "benchmarks" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


model = _load_model()


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, boltz_cache):
    from boltz_cp.data.synthetic import synthetic_proteins_yaml

    folder = tmp_path_factory.mktemp("bench")
    inp = folder / "two_chains.yaml"
    inp.write_text(synthetic_proteins_yaml(24, chains=2))
    out = folder / "report.json"
    cmd = [sys.executable, "-m", "boltz_cp.bench", str(inp), "preset=tiny", "blocks.pairformer=1",
           "recycling_steps=1", "sampling_steps=2", f"cache={boltz_cache}", f"json={out}", "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_bench_report_structure(tiny_report):
    stdout, rep = tiny_report
    assert "| stage | calls |" in stdout and "| rank | tile (r, c) |" in stdout and "BENCH_JSON {" in stdout
    assert (rep["n_tokens"], rep["mesh"], rep["recycling_steps"], rep["sampling_steps"]) == (24, "1x1", 1, 2)
    assert rep["model"]["random"] and rep["model"]["blocks"]["pairformer"] == 1
    assert rep["kernels_attention"] == "auto" and "kernels.attention auto" in stdout
    stages = {s["stage"]: s for s in rep["stages"]}
    calls = {"trunk: pairformer": 2, "trunk: MSA module": 2, "trunk: templates": 2,
             "trunk: recycle (templates + MSA + pairformer)": 2, "diffusion step (score model)": 2,
             "trunk: input embedder": 1, "diffusion conditioning": 1, "sampling (all steps)": 1,
             "confidence": 1, "confidence: pairformer": 1, "forward (whole model)": 1,
             "gather outputs to rank 0": 1, "write outputs (rank 0)": 1, "featurize (parse + featurize_lean)": 1}
    for name, n in calls.items():
        assert stages[name]["calls"] == n, name
        assert stages[name]["seconds_rank0"] >= 0 and stages[name]["seconds_max"] >= stages[name]["seconds_rank0"]
    forward = stages["forward (whole model)"]
    for name in ("trunk: pairformer", "sampling (all steps)", "confidence"):  # nested in the forward
        assert 0 <= stages[name]["peak_bytes_max"] <= forward["peak_bytes_max"]
        assert stages[name]["depth"] >= 1
        assert 0 < stages[name]["launches_rank0"] < forward["launches_rank0"]  # kernel launches counted, nested
    (rank,) = rep["ranks"]
    assert rank["forward_act_bytes"] == forward["peak_bytes_max"]
    assert rank["rss_peak_bytes"] > rank["forward_act_bytes"] > 0 and rank["parameter_bytes"] > 0


def test_report_feeds_the_model(tiny_report):
    _, rep = tiny_report
    r = model.compare(rep)
    assert r["memory"] and all(math.isfinite(m) and m > 0 for _, _, m in r["memory"])
    ops = {name: (meas, mod) for name, meas, mod in r["ops"]}
    assert all(meas > 0 for meas, _ in ops.values())  # kernel launches counted per stage
    for name in ("trunk: pairformer", "trunk: MSA module", "diffusion step (score model)", "confidence: pairformer"):
        assert ops[name][1] > 0, name  # ... and the plan counts them where it charges dispatch


def test_bench_settings():
    from boltz_cp.cli.bench import main, validate_bench
    from boltz_cp.cli.config import compose_config
    from boltz_cp.models.presets import PRESETS, apply_blocks

    hp = copy.deepcopy(PRESETS["full"])
    used = apply_blocks(hp, {"pairformer": 2, "token_transformer": 3}, limit_to_existing=True)
    assert hp["pairformer_args"]["num_blocks"] == 2 and used["pairformer"] == 2 and used["msa"] == 4
    assert hp["score_model_args"]["token_transformer_depth"] == 3
    assert PRESETS["full"]["pairformer_args"]["num_blocks"] == 64  # the preset itself is untouched
    hp = copy.deepcopy(PRESETS["full"])
    with pytest.raises(ConfigError, match="only 64"):
        apply_blocks(hp, {"pairformer": 65}, limit_to_existing=True)
    with pytest.raises(ConfigError, match="positive integer"):
        apply_blocks(hp, {"msa": 0}, limit_to_existing=False)
    with pytest.raises(ConfigError, match="unknown blocks"):
        apply_blocks(hp, {"trunk": 1}, limit_to_existing=False)
    cfg = compose_config(["mesh=2x2", "preset=full", "blocks.pairformer=1"], name="bench")
    assert (cfg.mesh.rows, cfg.model.backend, cfg.blocks.pairformer, cfg.recycling_steps) == (2, "cp", 1, 3)
    assert compose_config(["kernels.attention=torch"], name="bench").kernels.attention == "torch"
    with pytest.raises(ConfigError, match="kernels.attention"):
        validate_bench(compose_config(["kernels.attention=flex"], name="bench"))
    with pytest.raises(ConfigError, match="not both"):
        validate_bench(compose_config(["preset=tiny", "checkpoint=x.ckpt"], name="bench"))
    with pytest.raises(ConfigError, match="positive integer"):
        validate_bench(compose_config(["blocks.msa=0"], name="bench"))
    assert main(["missing.yaml", "preset=tiny"]) == 2  # a user error: one line, status 2


def test_model_memory_monotone():
    for prec in ("fp32", "bf16"):
        for n in (1000, 3605, 30000):
            per_side = [model.memory_summary(model.geometry(n, side), precision=prec) for side in (1, 2, 4, 8)]
            acts = [m["activations"] for m in per_side]
            assert all(math.isfinite(a) and a > 0 for a in acts)
            assert all(a > b for a, b in zip(acts, acts[1:])), (prec, n, acts)  # falls with p at fixed N
            assert 0.7 < acts[0] / (acts[1] * 4) < 1.4  # ~1/P
        sizes = [model.memory_summary(model.geometry(n, 2), precision=prec)["activations"]
                 for n in (1000, 2000, 5000)]
        assert sizes[0] < sizes[1] < sizes[2]
    g = model.geometry(3605, 2)
    assert model.memory_summary(g, precision="bf16")["total"] < model.memory_summary(g, precision="fp32")["total"]
    assert model.parameter_count(model.BOLTZ2) == 506_724_992  # the released checkpoint's count


def test_model_time_and_comm():
    hp = model.BOLTZ2
    for kind in ("as implemented", "tf32", "fused"):
        mach = model.h100_variant(kind)
        times = [model.sample_time(model.geometry(3605, side), hp, mach, "bf16")[0] for side in (1, 2, 4)]
        assert all(math.isfinite(t) and t > 0 for t in times) and times[0] > times[1] > times[2]
    fewer = replace(hp, sampling_steps=20)
    g = model.geometry(2000, 2)
    assert model.sample_time(g, fewer, model.H100, "fp32")[0] < model.sample_time(g, hp, model.H100, "fp32")[0]
    assert model.ring_step_table(model.geometry(1000, 1)) == []
    rows = model.ring_step_table(model.geometry(1000, 2))
    assert rows and all(b > 0 and steps > 0 for _, _, b, steps in rows)
