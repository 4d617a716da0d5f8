"""MSAs from an MSA server (`use_msa_server=true`). Tier: no process group (the client against the
failure modes) and end-to-end CLI (1x1 and 2x2 under torchrun, with deadlines).

Every case talks to a real HTTP server the test starts on 127.0.0.1 (tests/msa_test_server.py),
through upstream's own client; nothing is patched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from msa_test_server import MsaTestServer
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SEQ_A = "MKTAYIAKQRQISFVKSH"
SEQ_B = "GSHMSLFDKLPQ"
SEQ_BAD = "MVLSPADKTNVKAAW"
PASSWORD = "pw-5ecret-Q7"
API_KEY = "key-5ecret-Z9"


def _yaml(*chains: tuple[str, str]) -> str:
    return "version: 1\nsequences:\n" + "".join(
        f"  - protein: {{id: {cid}, sequence: {seq}}}\n" for cid, seq in chains)


def _settings(url: str, timeout_s: float = 60) -> OmegaConf:
    return OmegaConf.create({
        "msa_server_url": url, "msa_pairing_strategy": "greedy", "msa_server_username": None,
        "msa_server_password": None, "api_key_header": None, "api_key_value": None,
        "msa_server_timeout_s": timeout_s,
    })


@pytest.fixture(scope="module")
def two_chain_target(tmp_path_factory, boltz_cache):
    from boltz_cp.data.inputs import parse_target

    path = tmp_path_factory.mktemp("msa") / "two.yaml"
    path.write_text(_yaml(("A", SEQ_A), ("B", SEQ_B)))
    return parse_target(path, boltz_cache / "mols")


@pytest.mark.parametrize("failure,reason", [
    ("down", "cannot connect (Connection refused)"),
    ("slow", "no reply within 2 s (msa_server_timeout_s)"),
    ("http_error", "HTTP 500 on submission"),
    ("malformed", "malformed reply (ReadError"),
])
def test_server_failures_are_one_line(failure, reason, tmp_path, two_chain_target):
    """Server down, too slow, HTTP error, malformed reply: one line naming the server and the
    chains, within the deadline, and nothing in the cache."""
    import time

    from boltz_cp.data.msa_server import MsaServer, fetch_msas
    from boltz_cp.errors import InputError

    server = MsaTestServer(None if failure == "down" else failure)
    url = server.url
    if failure == "down":
        server.httpd.server_close()  # the port is closed: nobody listens
    else:
        server.__enter__()
    try:
        start = time.monotonic()
        with pytest.raises(InputError) as e:
            fetch_msas(two_chain_target, MsaServer.from_config(_settings(url, timeout_s=2), tmp_path))
        assert time.monotonic() - start < 30
    finally:
        if failure != "down":
            server.__exit__()
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"MSA server {url} gave no paired MSA of chains A, B: "), line
    assert reason in line, line
    assert not (tmp_path / "msa").exists() or not any((tmp_path / "msa").iterdir())


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)


def _no_secret_anywhere(r: subprocess.CompletedProcess, out: Path) -> None:
    for secret in (PASSWORD, API_KEY):
        assert secret not in r.stdout and secret not in r.stderr
        for f in out.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


def test_fold_from_server_2x2_then_1x1_from_the_cache(tmp_path, boltz_cache, tiny_ckpt):
    """A two-chain protein input without MSAs folds on 2x2 with one rank asking the server once
    per request (basic auth from the command line); then a folder on 1x1 (API key from the
    environment) folds it again without any request, folds a homodimer of a cached chain
    without any request, and fails alone the input whose chain the server rejects. Neither
    secret shows in any output stream or output file."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mols").symlink_to(boltz_cache / "mols")  # residues; the MSA cache starts empty
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.yaml").write_text(_yaml(("A", SEQ_A), ("B", SEQ_B)))
    (inputs / "b.yaml").write_text(_yaml(("A", SEQ_A), ("B", SEQ_A)))
    (inputs / "c.yaml").write_text(_yaml(("A", SEQ_BAD)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MSA_API_KEY_VALUE", None)
    env.pop("BOLTZ_MSA_PASSWORD", None)

    with MsaTestServer(basic_auth=("alice", PASSWORD), api_key=("X-API-Key", API_KEY), reject=(SEQ_BAD,)) as server:
        common = [f"cache={cache}", f"checkpoint={tiny_ckpt}", "recycling_steps=0", "sampling_steps=2",
                  "use_msa_server=true", f"msa_server_url={server.url}", "msa_server_timeout_s=120"]
        out2 = tmp_path / "out2x2"
        r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                  "-m", "boltz_cp", "predict", str(inputs / "a.yaml"), "mesh=2x2", f"out_dir={out2}", *common,
                  "msa_server_username=alice", f"msa_server_password={PASSWORD}",
                  "gpu_memory_gb=1000"], env, timeout=600)  # the memory check sizes it from the fetched MSAs
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out2 / "boltz_results_a" / "predictions" / "a" / "a_model_0.cif").exists()
        assert dict(server.submissions) == {"ticket/pair": 1, "ticket/msa": 1}  # one rank asked, once
        assert "memory check: a.yaml (" in r.stderr and "MSA depth 1 " not in r.stderr, r.stderr[-3000:]
        msa = (out2 / "boltz_results_a" / "processed" / "msa")
        assert len(list(msa.glob("a_*.npz"))) == 2
        written = (out2 / "boltz_results_a" / "boltz_cp_config.yaml").read_text()
        assert "msa_server_password: <redacted>" in written
        _no_secret_anywhere(r, out2)

        asked = server.requests
        out1 = tmp_path / "out1x1"
        r = _run([sys.executable, "-m", "boltz_cp", "predict", str(inputs), f"out_dir={out1}", *common],
                 {**env, "MSA_API_KEY_VALUE": API_KEY}, timeout=600)
        assert r.returncode == 2, r.stderr[-3000:]
        assert "1 of 3 inputs failed" in r.stderr, r.stderr[-3000:]
        assert f"c.yaml: MSA server {server.url} gave no MSA of chain A: HTTP 500 on submission" in r.stderr
        for name, answers in (("a", 3), ("b", 1)):  # a: the paired set and both chains; b: one chain
            want = f"{name}.yaml: MSAs from {server.url}: 0 request(s), {answers} answer(s) from the cache"
            assert want in r.stderr, r.stderr[-3000:]
        assert server.requests == asked + 1  # c.yaml's one refused submission; a and b from the cache
        preds = out1 / "boltz_results_inputs" / "predictions"
        assert sorted(p.name for p in preds.iterdir()) == ["a", "b"]
        assert "Traceback" not in r.stderr
        _no_secret_anywhere(r, out1)
    assert not list(tmp_path.rglob(".staging-*"))
    assert not [f for f in (cache / "msa").iterdir() if f.name.startswith(".")]  # no temporary left


def test_settings_checked_and_secrets_redacted(monkeypatch):
    """Upstream's refusals are config errors before any work; `--cfg job` hides the secrets;
    credentials come from upstream's environment variables."""
    from boltz_cp.cli.config import compose_config, config_help
    from boltz_cp.data.msa_server import MsaServer
    from boltz_cp.errors import ConfigError

    cfg = compose_config(["use_msa_server=true", f"msa_server_password={PASSWORD}", f"api_key_value={API_KEY}"])
    shown = config_help(cfg)
    assert PASSWORD not in shown and API_KEY not in shown and "api_key_value: <redacted>" in shown
    with pytest.raises(ConfigError, match="not both"):
        MsaServer.from_config(compose_config(["msa_server_username=u", f"msa_server_password={PASSWORD}",
                                              f"api_key_value={API_KEY}"]), None)
    with pytest.raises(ConfigError, match="msa_pairing_strategy=best is not one of greedy, complete"):
        MsaServer.from_config(compose_config(["msa_pairing_strategy=best"]), None)
    monkeypatch.setenv("BOLTZ_MSA_USERNAME", "alice")
    monkeypatch.setenv("BOLTZ_MSA_PASSWORD", PASSWORD)
    server = MsaServer.from_config(compose_config([]), None)
    assert (server.username, server.password, server.url) == ("alice", PASSWORD, "https://api.colabfold.com")
    assert PASSWORD not in repr(server)


def test_cache_is_trusted_only_whole(tmp_path, two_chain_target):
    """A second fetch asks nothing; a damaged cache entry or a leftover temporary file (a run
    killed while writing) is not trusted: that entry alone is fetched again, with the same rows."""
    from boltz_cp.data.msa_server import FetchStats, MsaServer, fetch_msas

    with MsaTestServer() as server:
        settings = MsaServer.from_config(_settings(server.url), tmp_path)
        first = fetch_msas(two_chain_target, settings, FetchStats())
        assert dict(server.submissions) == {"ticket/pair": 1, "ticket/msa": 1}
        stats = FetchStats()
        assert fetch_msas(two_chain_target, settings, stats) == first
        assert (stats.requests, stats.cached, sum(server.submissions.values())) == (0, 3, 2)
        entries = sorted((tmp_path / "msa").glob("*.json"), key=lambda f: f.stat().st_size)
        assert len(entries) == 3  # the paired set, then one per sequence
        entries[0].write_text(entries[0].read_text()[: entries[0].stat().st_size // 2])
        (tmp_path / "msa" / f".{entries[1].stem}.tmp999").write_text('[">1\\nXX\\n"]')
        stats = FetchStats()
        assert fetch_msas(two_chain_target, settings, stats) == first
        assert (stats.requests, stats.cached, sum(server.submissions.values())) == (1, 2, 3)


@pytest.mark.parametrize("name,text,asks", [
    ("a.yaml", "version: 1\nsequences:\n  - protein: {id: A, sequence: MKT}\n", True),
    ("b.yaml", "version: 1\nsequences:\n  - protein: {id: A, sequence: MKT, msa: empty}\n", False),
    ("c.yaml", "version: 1\nsequences:\n  - dna: {id: A, sequence: ATGC}\n", False),
    ("d.fasta", ">A|protein\nMKT\n>B|protein|empty\nMKV\n", True),
    ("e.fasta", ">A|protein|x.a3m\nMKT\n>B|dna\nATGC\n", False),
    ("f.yaml", "sequences: [not, a, mapping\n", False),
])
def test_which_inputs_ask_the_server(tmp_path, name, text, asks):
    """Only inputs with a protein chain given without an MSA go to the server (a malformed one is
    left to its parser's error)."""
    from boltz_cp.data.msa_server import may_need_server

    path = tmp_path / name
    path.write_text(text)
    assert may_need_server(path) is asks
