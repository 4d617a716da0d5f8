"""Fault behaviour of a multi-rank run: a rank that dies stops its whole mesh, promptly, with a
clear line from every rank that reports and nothing partial in the results.

Tier: end-to-end CLI under torchrun (4 CPU ranks on a 2x2 mesh, gloo); every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Generous for 4 ranks on 2 loaded cores; a hang would run into timeout_s=120 and then this.
EXIT_DEADLINE_S = 90


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in environ if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _workers(agent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    return {rank: int(pid) for pid in children if (rank := _rank_of(int(pid))) is not None}


def test_a_killed_rank_stops_every_rank_without_partial_output(tmp_path, boltz_cache, tiny_ckpt):
    from boltz_cp.data.synthetic import synthetic_proteins_yaml

    inp = tmp_path / "big.yaml"
    inp.write_text(synthetic_proteins_yaml(160, chains=2))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "boltz_cp",
           "predict", str(inp), f"out_dir={out}", f"cache={boltz_cache}", f"checkpoint={tiny_ckpt}", "mesh=2x2",
           "recycling_steps=3", "sampling_steps=20", "timeout_s=120"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    in_trunk = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "trunk: recycle 2/" in line:
                in_trunk.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert in_trunk.wait(timeout=240), "".join(lines[-40:])
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1, 2, 3], workers
        os.kill(workers[1], signal.SIGKILL)  # mid-trunk: recycle 2 of 4 has started on the writer
        killed_at = time.monotonic()
        proc.wait(timeout=EXIT_DEADLINE_S)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode != 0
    assert took < EXIT_DEADLINE_S
    for rank, pid in workers.items():
        assert not Path(f"/proc/{pid}").exists() or _rank_of(pid) is None, f"rank {rank} still runs"
    # Every surviving rank that reports says why in one line; none shows a boltz_cp traceback.
    reports = [line for line in stderr.splitlines() if line.startswith("boltz_cp: error:")]
    assert reports, stderr[-3000:]
    assert all("lost contact with another rank" in line or "stopped by SIGTERM" in line for line in reports), reports
    assert not [r for r in reports if "[rank 1/4]" in r]
    ours = re.compile(r'File ".*boltz_cp/(cli|data|distributed|layers|models|modules)/')
    assert not [line for line in stderr.splitlines() if ours.search(line)], stderr[-3000:]
    # torchrun's summary names the rank that died.
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", stderr), stderr[-3000:]
    results = out / "boltz_results_big"
    assert not (results / "predictions").exists() or not any((results / "predictions").iterdir())
    assert not list(out.rglob(".staging-*")), list(out.rglob(".staging-*"))


def test_stale_staging_of_a_killed_writer_is_removed(tmp_path):
    """No process group: a staging folder whose writer (this host) is gone is removed at the next
    run; a live writer's, or another host's, is left alone."""
    import socket

    from boltz_cp.cli.predict import _remove_stale_staging, _staging_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folders = {}
    for name, owner in (("dead", f"{socket.gethostname()} {int(dead.stdout)}"),
                        ("live", f"{socket.gethostname()} {os.getpid()}"),
                        ("elsewhere", f"another-host {int(dead.stdout)}")):
        folders[name] = tmp_path / f".staging-{name}-1"
        folders[name].mkdir()
        (folders[name] / ".owner").write_text(owner)
    mine = _staging_dir(tmp_path, "x", writer=True)
    _remove_stale_staging(tmp_path)
    assert not folders["dead"].exists()
    assert folders["live"].exists() and folders["elsewhere"].exists() and mine.exists()
    private = _staging_dir(tmp_path, "x", writer=False)  # other ranks never stage in the results
    assert tmp_path not in private.parents
    private.rmdir()


def test_out_of_memory_is_one_line_naming_the_input(tmp_path, small_input, boltz_cache, tiny_ckpt, monkeypatch, capsys):
    """In process (a world of one): an allocator failure inside the model is reported as one line
    that names the input and its size, exit status 2, and nothing is left in the results."""
    import torch

    import boltz_cp.cli.predict as predict
    from boltz_cp.cli.main import main

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(predict, "run_model", out_of_memory)
    out = tmp_path / "out"
    rc = main(["predict", str(small_input), f"out_dir={out}", f"cache={boltz_cache}", f"checkpoint={tiny_ckpt}",
               "recycling_steps=0", "sampling_steps=2", "progress=false"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(r"boltz_cp: error: small: out of memory on cpu at \d+ tokens \(mesh 1x1\)", err), err
    assert not (out / "boltz_results_small" / "predictions").exists()
    assert not list(out.rglob(".staging-*"))
