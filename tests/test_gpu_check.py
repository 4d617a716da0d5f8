"""The prepared GPU check's dry run (`python scripts/gpu_check.py --dry-run`): on CPU it lists
every step and checks that the scripts and inputs exist and that every `boltz_cp predict`
command it would run composes and validates. The real run needs a CUDA GPU.

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
    from boltz_cp.cli.config import compose_config

    has_kernels = "kernels" in compose_config([])
    assert ("kernels.attention=fused" in out) == has_kernels
    assert ("has no kernels.attention setting" in out) == (not has_kernels)
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_dry_run_reports_a_bad_setting(tmp_path):
    """The check is real: a plan whose predict settings do not validate is refused."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    steps, _ = gpu_check.build_plan(tmp_path, [64])
    steps[3]["runs"][0]["argv"].append("model.backend=nonsense")
    problems = gpu_check.validate_plan(steps)
    assert len(problems) == 1 and "model.backend=nonsense" in problems[0]
