"""Weights and mols.tar on first use (boltz_cp/cli/weights.py), from a file server this test
starts on 127.0.0.1 and points `weights_url` at. Tiers: no PG (downloads, verification), gloo
CPU (4 ranks share one download), end-to-end CLI (a first-use run and a rerun; offline).

Tiny stand-ins only: a torch.save'd dict or the tiny random checkpoint, and a tar of the test
residue library.
"""

from __future__ import annotations

import http.server
import io
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from recording_log import RecordingLog

from boltz_cp.cli import weights as W


class FileServer:
    """Serves `files` (name -> bytes) at /<name>; counts requests; names in `cut` get their full
    Content-Length but only half the bytes before the connection closes."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.requests = dict(files), set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                name = self.path.lstrip("/")
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in server.cut else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, name: str) -> int:
        return self.requests.count(name)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _fake_ckpt(seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.randn(8, generator=torch.Generator().manual_seed(seed))}}, buf)
    return buf.getvalue()


def _mols_tar(mol_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(mol_dir, arcname="mols")
    return buf.getvalue()


@pytest.fixture
def server(boltz_cache):
    files = {W.CHECKPOINT_NAME: _fake_ckpt(0), W.AFFINITY_CHECKPOINT_NAME: _fake_ckpt(1),
             W.MOLS_TAR: _mols_tar(boltz_cache / "mols")}
    s = FileServer(files)
    yield s
    s.close()


def _cfg(url: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(checkpoint=None, affinity_checkpoint=None, weights_url=url, **kw)


def _trusted(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()}


def test_urls_are_upstreams_unless_mirrored():
    from boltz import main

    assert W.urls_for(W.CHECKPOINT_NAME, None) == main.BOLTZ2_URL_WITH_FALLBACK
    assert W.urls_for(W.AFFINITY_CHECKPOINT_NAME, None) == main.BOLTZ2_AFFINITY_URL_WITH_FALLBACK
    assert W.urls_for(W.MOLS_TAR, None) == [main.MOL_URL]
    assert W.urls_for(W.MOLS_TAR, "http://m/x/") == ["http://m/x/mols.tar"]


def test_only_what_the_run_needs(tmp_path):
    assert W.needed(_cfg(None), tmp_path, affinity=False) == [W.MOLS_TAR, W.CHECKPOINT_NAME]
    assert W.needed(_cfg(None), tmp_path, affinity=True)[-1] == W.AFFINITY_CHECKPOINT_NAME
    given = SimpleNamespace(checkpoint="x.ckpt", affinity_checkpoint="y.ckpt", weights_url=None)
    (tmp_path / "mols").mkdir()
    assert W.needed(given, tmp_path, affinity=True) == []


def _share_one_download(url: str, cache: str):
    import torch.distributed as dist

    log = RecordingLog()
    got = W.ensure_downloads(_cfg(url), Path(cache), True, dist.get_rank(), log)  # one node: LOCAL_RANK = rank
    return got, sorted(p.name for p in Path(cache).iterdir()), log.lines


def test_four_ranks_download_each_file_once(run_on_world, server, tmp_path):
    cache = tmp_path / "cache"
    results = run_on_world(_share_one_download, 4, server.url, str(cache), timeout=120)
    assert results[0][0] == [W.MOLS_TAR, W.CHECKPOINT_NAME, W.AFFINITY_CHECKPOINT_NAME]
    assert all(r[0] == [] for r in results[1:])
    want = sorted([W.MOLS_TAR, "mols", W.CHECKPOINT_NAME, W.AFFINITY_CHECKPOINT_NAME])
    assert all(r[1] == want for r in results)  # every rank sees the files once the barrier lets it go
    assert sorted(server.requests) == sorted([W.MOLS_TAR, W.CHECKPOINT_NAME, W.AFFINITY_CHECKPOINT_NAME])
    assert (cache / W.CHECKPOINT_NAME).read_bytes() == server.files[W.CHECKPOINT_NAME]
    members = tarfile.open(fileobj=io.BytesIO(server.files[W.MOLS_TAR])).getnames()
    assert sorted(f"mols/{p.name}" for p in (cache / "mols").iterdir()) == sorted(members[1:])
    # a rerun downloads nothing
    results = run_on_world(_share_one_download, 4, server.url, str(cache), timeout=120)
    assert all(r[0] == [] for r in results) and len(server.requests) == 3


def test_cut_off_download_leaves_nothing_trusted(server, tmp_path):
    cache = tmp_path / "cache"
    server.cut.add(W.CHECKPOINT_NAME)
    log = RecordingLog()
    assert W.ensure_downloads(_cfg(server.url), cache, False, 0, log) == [W.MOLS_TAR]
    assert _trusted(cache) == {W.MOLS_TAR, "mols"}  # no checkpoint, no temporary left
    assert [line for line in log.lines if "WARNING" in line] == [
        line for line in log.lines if line.startswith(f"WARNING: could not download {W.CHECKPOINT_NAME}")]
    assert server.url in log.lines[-1] and ("cut off" in log.lines[-1] or "IncompleteRead" in log.lines[-1])
    server.cut.clear()  # the next run gets the whole file
    assert W.ensure_downloads(_cfg(server.url), cache, False, 0, log) == [W.CHECKPOINT_NAME]
    assert (cache / W.CHECKPOINT_NAME).read_bytes() == server.files[W.CHECKPOINT_NAME]


def test_bad_files_are_not_trusted(server, tmp_path):
    cache = tmp_path / "cache"
    server.files[W.CHECKPOINT_NAME] = b"<html>not a checkpoint</html>"
    whole = server.files[W.MOLS_TAR]
    server.files[W.MOLS_TAR] = whole[: len(whole) // 2]  # a short tar, served as complete
    log = RecordingLog()
    assert W.ensure_downloads(_cfg(server.url), cache, False, 0, log) == []
    assert _trusted(cache) == set(), _trusted(cache)
    assert any("not a torch checkpoint" in line for line in log.lines)
    assert any("does not extract" in line for line in log.lines)


def _run_cli(*args: str, timeout: float = 300, nproc: int = 0):
    import subprocess

    from test_cli import ENV, REPO

    launch = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc-per-node={nproc}"]
    return subprocess.run([*launch, "-m", "boltz_cp", "predict", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=REPO)


@pytest.mark.parametrize("side", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_first_use_run_then_rerun(tmp_path, small_input, boltz_cache, tiny_ckpt, side):
    """An empty cache: a 1x1 (2x2: slow, ~80 s) run downloads the checkpoint and mols.tar once
    (one request each) and folds; a rerun downloads nothing."""
    s = FileServer({W.CHECKPOINT_NAME: tiny_ckpt.read_bytes(), W.MOLS_TAR: _mols_tar(boltz_cache / "mols")})
    try:
        cache, out = tmp_path / "cache", tmp_path / "out"
        args = (str(small_input), f"out_dir={out}", f"cache={cache}", f"weights_url={s.url}", "recycling_steps=0",
                "sampling_steps=2", "plots=false", f"mesh={side}x{side}", "precision=fp32")
        nproc = side * side if side > 1 else 0
        r = _run_cli(*args, nproc=nproc, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"downloading {W.CHECKPOINT_NAME} from {s.url}/{W.CHECKPOINT_NAME}" in r.stderr
        assert sorted(s.requests) == [W.CHECKPOINT_NAME, W.MOLS_TAR]
        assert (out / "boltz_results_small" / "predictions" / "small" / "small_model_0.cif").exists()
        r = _run_cli(*args, nproc=nproc, timeout=600)  # the input is skipped; the cache is checked all the same
        assert r.returncode == 0 and "skipping" in r.stderr and "downloading" not in r.stderr, r.stderr[-3000:]
        assert len(s.requests) == 2
    finally:
        s.close()


def test_offline_keeps_the_message(tmp_path, small_input):
    """No server at weights_url: one warning per file, then the usual missing-checkpoint message."""
    s = FileServer({})
    url = s.url
    s.close()  # nothing listens there now
    cache = tmp_path / "cache"
    (cache / "mols").mkdir(parents=True)  # the residue library is not what this test is about
    r = _run_cli(str(small_input), f"out_dir={tmp_path / 'out'}", f"cache={cache}", f"weights_url={url}",
                 timeout=120)
    assert r.returncode != 0
    assert f"WARNING: could not download {W.CHECKPOINT_NAME}: {url}/{W.CHECKPOINT_NAME}" in r.stderr, r.stderr[-2000:]
    for hint in (f"Boltz-2 checkpoint not found: {cache / W.CHECKPOINT_NAME}", "boltz predict", "checkpoint=PATH"):
        assert hint in r.stderr, (hint, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and not list(cache.glob(".*part*"))
