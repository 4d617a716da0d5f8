"""The prepared GPU check's dry run (`python scripts/gpu_check.py --dry-run`): on CPU it lists
every step and checks that the scripts and inputs exist and that every `boltz_cp predict`
command it would run composes and validates. The real run needs a CUDA GPU.

Step (a)'s verdict logic also runs on CPU, with the kernels replaced by the contract stand-ins
of tests/test_kernels_cuda.py.

Tier: end-to-end CLI (one subprocess, no PG).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_lists_every_step_and_its_commands_parse(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--work", str(tmp_path),
                        "--sizes", "512", "1024", "2048"],
                       capture_output=True, text=True, timeout=240, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "0 problem(s)" in out and "PROBLEM" not in out
    for section in ("(env)", "(a) kernels", "(b) predict 1x1 cp vs reference", "(c) predict 2x2", "(d) cp vs upstream"):
        assert section in out, section
    assert "--nproc-per-node 4" in out and "mesh=2x2 dist_backend=gloo" in out
    for n in (512, 1024, 2048):
        assert f"run N={n} reference" in out and f"synthetic_{n}.yaml" in out
    assert "model.backend=reference" in out and "model.backend=cp" in out
    for kernel in ("torch", "fused", "cueq"):
        assert f"run N=512 cp {kernel}" in out and f"kernels.attention={kernel}" in out
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_dry_run_reports_a_bad_setting(tmp_path):
    """The check is real: a plan whose predict settings do not validate is refused."""
    g = _gpu_check_module()
    steps = g.build_plan(tmp_path, [64])
    steps[3]["runs"][0]["argv"].append("model.backend=nonsense")
    steps[4]["runs"][0]["argv"].append("dist_backend=mpi")
    problems = g.validate_plan(steps)
    assert len(problems) == 2 and "model.backend=nonsense" in problems[0] and "dist_backend=mpi" in problems[1]


def _gpu_check_module():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_kernel_step_verdicts_with_stand_ins(tmp_path, monkeypatch):
    """Step (a)'s own code on CPU, the CUDA kernels replaced by the contract stand-ins of
    tests/test_kernels_cuda.py: every row passes; a kernel that adds an error is flagged."""
    import json

    import torch

    from boltz_cp.kernels import cuda as kc
    from test_kernels_cuda import FakeEfficient, fake_triangle_attention

    g = _gpu_check_module()
    eff, cueq = kc.efficient_block, kc.cueq_block
    monkeypatch.setattr(kc, "efficient_block", lambda *a, **k: eff(*a, op=FakeEfficient(), **k))
    monkeypatch.setattr(kc, "cueq_block", lambda *a, **k: (lambda o, lse: (o + 1e-3, lse))(
        *cueq(*a, fn=fake_triangle_attention, **k)))  # a "kernel" 1e-3 off
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    monkeypatch.setattr(g, "BIG", 40)
    monkeypatch.setattr(g, "KERNEL_SHAPES", ((3, 24, 33),))
    g.step_kernels(tmp_path / "k.json", dev="cpu")
    res = json.loads((tmp_path / "k.json").read_text())
    verdicts = {(r["dtype"], r["backend"]): r.get("ok") for r in res["accuracy"]}
    assert verdicts[("float32", "fused")] and verdicts[("bfloat16", "fused")]
    assert verdicts[("float32", "cueq")] is False  # 1e-3 > the fp32 bar
    assert verdicts[("bfloat16", "cueq")] is True  # within bf16's
    assert {(r["dtype"], r["backend"]) for r in res["timing"]} >= {("float32", "fused"), ("bfloat16", "cueq")}
    assert "| float32 | [3, 24, 33] | cueq |" in "\n".join(g._section_a(res))
