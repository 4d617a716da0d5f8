"""Data parallel (`dp=D`), `mesh=auto`, and naming the rank that failed.

Tiers: no process group (mesh=auto resolution; the failure records on a real localhost
TCPStore, in process) and torchrun on CPU/gloo (dp=2 over 1x1 meshes; a 2x2 run whose writer
alone fails). Every subprocess has a deadline, so a hang fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from boltz_cp.cli.config import compose_config
from boltz_cp.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
OURS = re.compile(r'File ".*boltz_cp/(cli|data|distributed|layers|models|modules)/')


def _torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "boltz_cp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def _args(inp: Path, out: Path, cache: Path, ckpt: Path, *extra: str, steps: int = 2) -> list[str]:
    return ["predict", str(inp), f"out_dir={out}", f"cache={cache}", f"checkpoint={ckpt}",
            "recycling_steps=0", f"sampling_steps={steps}", "timeout_s=120", *extra]


def _inputs(folder: Path) -> Path:
    """a, b good (two short proteins each); c malformed (an entity type that does not exist).
    With dp=2: a and c go to mesh 0, b to mesh 1."""
    from boltz_cp.data.synthetic import synthetic_proteins_yaml

    folder.mkdir()
    (folder / "a.yaml").write_text(synthetic_proteins_yaml(16, chains=2, seed=1))
    (folder / "b.yaml").write_text(synthetic_proteins_yaml(14, chains=1, seed=2))
    (folder / "c.fasta").write_text(">A|protein|empty\nMKT\n>B|peptide\nMK\n")
    return folder


def _prediction_files(preds: Path, name: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (preds / name).iterdir()}


def test_dp2_bad_input_fails_alone_then_resume_rebalances(tmp_path, boltz_cache, tiny_ckpt):
    """dp=2 on 2 processes (1x1 meshes, auto -> the cp backend on each): the malformed input
    fails on its mesh only, both good ones are written, every rank exits non-zero listing the bad
    one. A rerun (override=false) skips the two written inputs untouched and folds the rest."""
    inputs = _inputs(tmp_path / "inputs")
    out = tmp_path / "out"
    r = _torchrun(2, _args(inputs, out, boltz_cache, tiny_ckpt, "dp=2"))
    assert r.returncode != 0, r.stderr[-3000:]
    reports = [line for line in r.stderr.splitlines() if line.startswith("boltz_cp: error:")]
    assert reports and all("1 of 3 inputs failed" in line for line in reports), r.stderr[-3000:]
    assert "c.fasta: unknown entity type 'peptide'" in r.stderr
    assert not [line for line in r.stderr.splitlines() if OURS.search(line)], r.stderr[-3000:]
    # Each mesh's writer logs its share, prefixed with its index.
    assert "[mesh 0] 2 of 3 pending input(s) on this mesh: a.yaml, c.fasta" in r.stderr, r.stderr[-3000:]
    assert "[mesh 1] 1 of 3 pending input(s) on this mesh: b.yaml" in r.stderr
    results = out / "boltz_results_inputs"
    preds = results / "predictions"
    assert sorted(p.name for p in preds.iterdir()) == ["a", "b"]
    for name in ("a", "b"):
        assert (preds / name / f"{name}_model_0.cif").exists()
        assert json.loads((preds / name / f"confidence_{name}_model_0.json").read_text())["confidence_score"] >= 0
    assert not list(out.rglob(".staging-*")) and not list(out.rglob(".old-*"))
    config = (results / "boltz_cp_config.yaml").read_text()
    assert "dp: 2" in config and "backend: cp" in config
    before = {name: _prediction_files(preds, name) for name in ("a", "b")}

    # Resume: the fixed input is the only pending one, so mesh 0 gets it and mesh 1 none.
    (inputs / "c.fasta").write_text(">A|protein|empty\nMKTAYIAKQRQ\n")
    r = _torchrun(2, _args(inputs, out, boltz_cache, tiny_ckpt, "dp=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("a", "b"):
        assert f"{name}.yaml: predictions exist" in r.stderr and "skipping" in r.stderr
        assert _prediction_files(preds, name) == before[name]
    assert "[mesh 0] 1 of 1 pending input(s) on this mesh: c.fasta" in r.stderr, r.stderr[-3000:]
    assert "[mesh 1] 0 of 1 pending input(s) on this mesh: none" in r.stderr
    assert (preds / "c" / "c_model_0.cif").exists()
    assert len(re.findall(r"done: results in", r.stderr)) == 1


def test_dp2_cp_backend(tmp_path, boltz_cache, tiny_ckpt):
    """dp=2 of 1x2 CP meshes on 4 processes: each mesh folds its input with the CP model, its
    rings, halos and spans staying inside the mesh (ranks 2, 3 are tiles (0, 0), (0, 1) of mesh 1)."""
    inputs = _inputs(tmp_path / "inputs")
    (inputs / "c.fasta").unlink()
    out = tmp_path / "out"
    # 10 steps, as the CLI's cp-vs-reference tests: after 2 the coordinates are still ~1,000 A
    # away from the origin, where float32 resolves only ~1e-4 A and the 1e-3 A bar measures rounding.
    r = _torchrun(4, _args(inputs, out, boltz_cache, tiny_ckpt, "dp=2", "mesh=1x2", "model.backend=cp", steps=10))
    assert r.returncode == 0, r.stderr[-3000:]
    preds = out / "boltz_results_inputs" / "predictions"
    assert all((preds / n / f"{n}_model_0.cif").exists() for n in ("a", "b"))
    # Mesh 1's input equals the serial reference: a message crossing meshes would change it.
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "boltz_cp", *_args(inputs / "b.yaml", ref, boltz_cache, tiny_ckpt,
                                                                "model.backend=reference", steps=10)],
                       capture_output=True, text=True, timeout=240, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = _model(preds / "b"), _model(ref / "boltz_results_b" / "predictions" / "b")
    assert float(((got[0] - want[0]) ** 2).sum(-1).mean() ** 0.5) <= 1e-3
    assert abs(got[1] - want[1]) <= 1e-4


def _model(pred: Path):
    """Atom coordinates and confidence score of model 0 of a prediction folder."""
    import gemmi
    import numpy as np

    st = gemmi.read_structure(str(pred / f"{pred.name}_model_0.cif"))
    xyz = np.array([a.pos.tolist() for ch in st[0] for res in ch for a in res])
    return xyz, json.loads((pred / f"confidence_{pred.name}_model_0.json").read_text())["confidence_score"]


# -- mesh=auto ------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks, mesh", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (1, 5)),
                                         (6, (2, 3)), (7, (1, 7)), (8, (2, 4)), (9, (3, 3))])
def test_auto_mesh(ranks, mesh):
    from boltz_cp.distributed.mesh import auto_mesh

    assert auto_mesh(ranks) == mesh


@pytest.mark.parametrize("world, extra, mesh, backend", [
    (8, [], (2, 4), "cp"), (8, ["dp=2"], (2, 2), "cp"), (4, ["dp=4"], (1, 1), "cp"),
    (1, [], (1, 1), "cp"), (1, ["model.backend=reference"], (1, 1), "reference"), (6, [], (2, 3), "cp"),
])
def test_mesh_auto_resolves_before_any_rendezvous(world, extra, mesh, backend, monkeypatch):
    from omegaconf import OmegaConf

    from boltz_cp.cli.predict import validate

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = compose_config(["mesh=auto", *extra])
    assert (cfg.mesh.rows, cfg.mesh.cols) == ("auto", "auto")
    validate(cfg)
    assert (cfg.mesh.rows, cfg.mesh.cols) == mesh and cfg.model.backend == backend
    assert f"rows: {mesh[0]}\n  cols: {mesh[1]}" in OmegaConf.to_yaml(cfg)  # what boltz_cp_config.yaml shows


@pytest.mark.parametrize("world, overrides, message", [
    (6, ["mesh=auto", "dp=4"], "mesh=auto with dp=4 needs a world size divisible by 4, got 6"),
    (4, ["mesh=2x2", "mesh.rows=auto"], "mesh=auto sets both sides"),
    (4, ["mesh=2x2", "dp=0"], "dp must be a positive integer"),
    (4, ["mesh=2x2", "dp=2"], "2 x mesh 2x2 needs 8 processes but the world size is 4"),
    (2, ["mesh=2x1", "dp=1", "model.backend=reference"], "runs upstream's serial Boltz-2 on a 1x1 mesh only"),
])
def test_bad_mesh_or_dp(world, overrides, message, monkeypatch):
    from boltz_cp.cli.predict import validate

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(overrides))


def test_rectangular_meshes_pass_validation(monkeypatch):
    """No square-mesh check in the CLI any more: the CP layers say what they support."""
    from boltz_cp.cli.predict import validate

    for mesh, world in (("1x2", 2), ("2x1", 2), ("2x3", 6), ("2x4", 8), ("4x2", 8), ("4x8", 32)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cfg = compose_config([f"mesh={mesh}"])
        validate(cfg)
        assert f"{cfg.mesh.rows}x{cfg.mesh.cols}" == mesh and cfg.model.backend == "cp"


# -- naming the failed rank -------------------------------------------------------------------

@pytest.fixture
def store():
    """A real TCPStore server on localhost; `client()` opens another connection to it."""
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))

    def client():
        return dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=10))

    yield client
    from boltz_cp.cli import faults

    faults.attach(None, rank=0)
    faults.set_input(None)


def test_failure_record_is_read_by_the_other_ranks(store):
    import torch.distributed as dist

    from boltz_cp.cli import faults
    from boltz_cp.cli.main import _stopped, peer_failure
    from boltz_cp.errors import BoltzCPError, RankFailure

    lost = dist.DistNetworkError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        # Rank 1 (tile (0, 1) of a 2x2) fails on its own while folding big.yaml; then rank 3 too.
        faults.attach(store(), rank=1, coord=(0, 1))
        faults.set_input("big.yaml")
        faults.on_failure(BoltzCPError("big: out of memory on cuda:1 at 9000 tokens (mesh 2x2)\nmore detail"))
        faults.attach(store(), rank=3, coord=(1, 1))
        faults.on_failure(ValueError("a second failure"))  # the first record stays

        # Rank 2 loses contact: its one line names rank 1 and its input.
        faults.attach(store(), rank=2, coord=(1, 0))
        faults.on_failure(RankFailure("lost contact"))  # a peer failure records nothing
        failure = peer_failure(lost)
        assert str(failure) == ("lost contact with another rank: rank 1 (tile (0, 1)) failed on input big.yaml: "
                                "big: out of memory on cuda:1 at 9000 tokens (mesh 2x2)")
        with pytest.raises(RankFailure, match=r"^stopped by SIGTERM \(the launcher stops every rank once one "
                                              r"fails\): rank 1 \(tile \(0, 1\)\) failed on input big.yaml"):
            _stopped(signal.SIGTERM, None)
        assert peer_failure(ValueError("not a communication error")) is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_results_of_every_mesh_and_an_abort_while_waiting(store):
    """The end-of-run exchange: every mesh writer's failures on every rank; a failed rank
    anywhere stops the wait with its record (mesh index named when dp > 1)."""
    from boltz_cp.cli import faults
    from boltz_cp.errors import RankFailure

    faults.attach(store(), rank=0, dp=2, prefix="run1/")
    other = store()
    other.set("run1/result/1", json.dumps([[2, "c.fasta: bad"]]))
    assert faults.gather_meshes([[0, "a.yaml: bad"]], is_writer=True) == [[[0, "a.yaml: bad"]], [[2, "c.fasta: bad"]]]

    prefix = "run2/"
    faults.attach(store(), rank=0, dp=2, prefix=prefix)
    assert faults.share_from_rank0([0, 2], deadline_s=5) == [0, 2]
    body = json.dumps({"rank": 3, "dp": 2, "dp_index": 1, "coord": [0, 1], "input": "x.yaml", "message": "boom"})
    other.set(prefix + "failure/first", body)
    other.add(prefix + "aborted", 1)
    with pytest.raises(RankFailure, match=r"^stopped: rank 3 \(mesh 1, tile \(0, 1\)\) failed on input x.yaml: boom$"):
        faults.gather_meshes([], is_writer=True)


def test_store_errors_never_block_the_message():
    """A store that fails on every call: the plain lost-contact line, at once."""
    import time

    import torch.distributed as dist

    from boltz_cp.cli import faults
    from boltz_cp.cli.main import peer_failure

    class Broken:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise dist.DistStoreError("store is gone")
            return fail

    try:
        faults.attach(Broken(), rank=2, coord=(1, 0))
        faults.record_failure("x")  # swallowed
        start = time.monotonic()
        failure = peer_failure(dist.DistNetworkError("[gloo] Connection closed by peer"))
        assert time.monotonic() - start < 1
        assert str(failure).startswith("lost contact with another rank (") and "its own message" in str(failure)
        with pytest.raises(Exception, match="lost contact with the job's store"):
            faults.gather_meshes([], is_writer=False)
    finally:
        faults.attach(None, rank=0)


def test_a_rank_that_raises_is_named_by_the_others(tmp_path, boltz_cache, tiny_ckpt):
    """A genuine failure on one rank only: on a 2x2 mesh the writer alone publishes, and here it
    cannot (a file stands where the predictions folder goes). The other ranks, already done with
    the input, say that rank 0 failed on small.yaml and why."""
    from boltz_cp.data.synthetic import synthetic_proteins_yaml

    inp = tmp_path / "small.yaml"
    inp.write_text(synthetic_proteins_yaml(16, chains=2, seed=3))
    out = tmp_path / "out"
    (out / "boltz_results_small").mkdir(parents=True)
    (out / "boltz_results_small" / "predictions").write_text("in the way\n")
    r = _torchrun(4, _args(inp, out, boltz_cache, tiny_ckpt, "mesh=2x2"), timeout=300)
    assert r.returncode != 0
    reports = [line for line in r.stderr.splitlines() if line.startswith("boltz_cp: error:")]
    named = [line for line in reports if "rank 0 (tile (0, 0)) failed on input small.yaml: FileExistsError" in line]
    assert named, r.stderr[-3000:]
    assert not [line for line in reports if "[rank 0/4]" in line]  # the writer's own is its traceback
    assert not list(out.rglob(".staging-*"))
