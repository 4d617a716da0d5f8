"""MSAs from an MSA server. Tier: no process group (the client against the failure modes).

Every case talks to a real HTTP server the test starts on 127.0.0.1 (tests/msa_test_server.py),
through upstream's own client; nothing is patched.
"""

from __future__ import annotations

import pytest
from msa_test_server import MsaTestServer
from omegaconf import OmegaConf

SEQ_A = "MKTAYIAKQRQISFVKSH"
SEQ_B = "GSHMSLFDKLPQ"
SEQ_BAD = "MVLSPADKTNVKAAW"


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
