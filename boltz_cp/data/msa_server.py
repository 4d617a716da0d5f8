"""MSAs from an MMseqs2 (ColabFold API) server, as `boltz predict --use_msa_server` gets them,
with a cache and a deadline.

Upstream's own client does the talking (`boltz.data.msa.mmseqs2.run_mmseqs2`) and upstream's
`boltz.main.compute_msa` turns its replies into the per-entity CSV files the parser reads (paired
rows first, then unpaired ones), so the rows that reach the model are upstream's. Around them:

- a cache under `<cache>/msa/`: one file per (server, sequence) for unpaired MSAs and one per
  (server, pairing strategy, ordered sequence set) for paired ones, named by a SHA-256 of that
  key and written under a temporary name then renamed, so a killed run leaves nothing a later
  run reads; identical chains in an input, across a folder and across reruns are fetched once;
- a wall-clock deadline (`msa_server_timeout_s`): the client retries and polls without end, so it
  runs in a child process that is stopped at the deadline;
- one line per failure naming the server and the chains (server down, timeout, HTTP error,
  malformed reply), with the credentials scrubbed from it.

Credentials come from the settings or, as upstream reads them, from $BOLTZ_MSA_USERNAME,
$BOLTZ_MSA_PASSWORD and $MSA_API_KEY_VALUE; `redacted` hides them in a config that is shown or
written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from boltz_cp.errors import ConfigError, InputError

PAIRING_STRATEGIES = ("greedy", "complete")
SECRET_KEYS = ("msa_server_password", "api_key_value")
REDACTED = "<redacted>"


def redacted(cfg):
    """A copy of `cfg` with the MSA-server secrets replaced, for showing or writing it."""
    from omegaconf import OmegaConf, open_dict

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(out):
        for key in SECRET_KEYS:
            if out.get(key) is not None:
                out[key] = REDACTED
    return out


@dataclass(frozen=True)
class MsaServer:
    """Where and how to ask for MSAs (settings as upstream names them)."""

    url: str
    pairing_strategy: str = "greedy"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    api_key_header: str | None = None
    api_key_value: str | None = field(default=None, repr=False)
    timeout_s: float = 1800.0
    cache_dir: Path | None = None

    @classmethod
    def from_config(cls, cfg, cache: Path | None) -> MsaServer:
        """The server of `cfg`, with credentials from the environment where the settings have
        none (upstream's variables); ConfigError for settings upstream refuses."""
        env = os.environ
        server = cls(
            url=str(cfg.msa_server_url).rstrip("/"),
            pairing_strategy=cfg.msa_pairing_strategy,
            username=cfg.msa_server_username if cfg.msa_server_username is not None
            else env.get("BOLTZ_MSA_USERNAME"),
            password=cfg.msa_server_password if cfg.msa_server_password is not None
            else env.get("BOLTZ_MSA_PASSWORD"),
            api_key_header=cfg.api_key_header,
            api_key_value=cfg.api_key_value if cfg.api_key_value is not None else env.get("MSA_API_KEY_VALUE"),
            timeout_s=cfg.msa_server_timeout_s,
            cache_dir=None if cache is None else Path(cache) / "msa",
        )
        if server.pairing_strategy not in PAIRING_STRATEGIES:
            raise ConfigError(f"msa_pairing_strategy={server.pairing_strategy} is not one of "
                              f"{', '.join(PAIRING_STRATEGIES)}")
        if not isinstance(server.timeout_s, (int, float)) or isinstance(server.timeout_s, bool) \
                or server.timeout_s <= 0:
            raise ConfigError(f"msa_server_timeout_s must be a positive number, got {server.timeout_s!r}")
        if urlsplit(server.url).scheme not in ("http", "https") or not urlsplit(server.url).hostname:
            raise ConfigError(f"msa_server_url={server.shown_url} is not an http(s) URL")
        if server.username and server.password and server.api_key_value:
            raise ConfigError("give either msa_server_username/msa_server_password or api_key_value "
                              "(API-key header), not both (as upstream)")
        return server

    @property
    def shown_url(self) -> str:
        """The URL without any user:password part."""
        parts = urlsplit(self.url)
        if parts.username is None and parts.password is None:
            return self.url
        return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()

    def scrub(self, text: str) -> str:
        for secret in (self.password, self.api_key_value):
            if secret:
                text = text.replace(secret, REDACTED)
        return text.replace(self.url, self.shown_url)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of upstream's `compute_msa` for this server."""
        return {
            "msa_server_url": self.url,
            "msa_pairing_strategy": self.pairing_strategy,
            "msa_server_username": self.username,
            "msa_server_password": self.password,
            "api_key_header": self.api_key_header,
            "api_key_value": self.api_key_value,
        }


# -- which inputs need the server ----------------------------------------------------------------

def may_need_server(path: Path) -> bool:
    """Whether the input has a protein chain without an MSA (cheap, from the raw file; may say
    yes for an input the parser then rejects)."""
    import yaml

    from boltz_cp.data.inputs import SUFFIXES_FASTA

    try:
        if path.suffix.lower() in SUFFIXES_FASTA:
            for line in path.read_text().splitlines():
                if line.startswith(">"):
                    header = line[1:].split()[0].split("|") if line[1:].split() else []
                    if len(header) >= 2 and header[1].lower() == "protein" and (len(header) < 3 or not header[2]):
                        return True
            return False
        data = yaml.safe_load(path.read_text())
        for item in data.get("sequences", []):
            body = item.get("protein") if isinstance(item, dict) else None
            if isinstance(body, dict) and body.get("msa") in (None, ""):
                return True
    except Exception:  # noqa: BLE001 -- a malformed input is reported by the parser, by its owner
        return False
    return False


def missing_msas(target) -> dict[str, list[str]]:
    """Entity id -> chain names, for the protein chains of a parsed target that have no MSA."""
    from boltz.data import const

    prot = const.chain_type_ids["PROTEIN"]
    out: dict[str, list[str]] = {}
    for chain in target.record.chains:
        if chain.mol_type == prot and chain.msa_id == 0:
            out.setdefault(str(chain.entity_id), []).append(chain.chain_name)
    return out


def attach_msas(target, csvs: dict[str, str], folder: Path) -> None:
    """Write the fetched CSV MSAs (entity id -> text) into `folder` and point the target's chains
    at them, as upstream's `process_input` does before it parses MSAs."""
    folder.mkdir(parents=True, exist_ok=True)
    for chain in target.record.chains:
        text = csvs.get(str(chain.entity_id))
        if text is not None and chain.msa_id == 0:
            path = folder / f"{target.record.id}_{chain.entity_id}.csv"
            path.write_text(text)
            chain.msa_id = str(path)


# -- fetching ------------------------------------------------------------------------------------

@dataclass
class FetchStats:
    requests: int = 0  # client runs against the server (one per paired set, one per unpaired batch)
    cached: int = 0    # sequences or paired sets read from the cache


def fetch_msas(target, server: MsaServer, stats: FetchStats | None = None) -> dict[str, str]:
    """CSV MSAs (entity id -> text) for the target's protein chains without one, from the cache
    or the server; InputError naming the server and the chains when the server fails."""
    missing = missing_msas(target)
    if not missing:
        return {}
    stats = stats if stats is not None else FetchStats()
    target_id = target.record.id
    data = {f"{target_id}_{e}": target.sequences[int(e)] for e in missing}
    chains_of = {target.sequences[int(e)]: names for e, names in missing.items()}
    tmp = Path(tempfile.mkdtemp(prefix="boltz_cp_msa_"))
    try:
        with _client(_CachedClient(server, chains_of, stats)), redirect_stdout(io.StringIO()):
            import boltz.main

            boltz.main.compute_msa(data=data, target_id=target_id, msa_dir=tmp, **server.client_kwargs())
        return {e: (tmp / f"{target_id}_{e}.csv").read_text() for e in missing}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _client(fn):
    """Within the block, upstream's `compute_msa` calls `fn` instead of `run_mmseqs2`."""
    import boltz.main

    original = boltz.main.run_mmseqs2
    boltz.main.run_mmseqs2 = fn
    try:
        yield
    finally:
        boltz.main.run_mmseqs2 = original


class _CachedClient:
    """`run_mmseqs2`'s signature: answers from the cache, asks the server for the rest."""

    def __init__(self, server: MsaServer, chains_of: dict[str, list[str]], stats: FetchStats) -> None:
        self.server, self.chains_of, self.stats = server, chains_of, stats

    def __call__(self, x, prefix=None, use_env=True, use_filter=True, use_pairing=False, **_ignored) -> list[str]:
        seqs = [x] if isinstance(x, str) else list(x)
        assert use_env and use_filter, "compute_msa asks for env + filter"
        if use_pairing:
            key = self._key("paired-env", self.server.pairing_strategy, seqs)
            hit = _read_cache(self.server.cache_dir, key, len(seqs))
            if hit is not None:
                self.stats.cached += 1
                return hit
            got = self._ask(seqs, True)
            _write_cache(self.server.cache_dir, key, got)
            return got
        unique = list(dict.fromkeys(seqs))
        found = {s: _read_cache(self.server.cache_dir, self._key("unpaired-env", "", [s]), 1) for s in unique}
        self.stats.cached += sum(v is not None for v in found.values())
        todo = [s for s in unique if found[s] is None]
        if todo:
            for s, a3m in zip(todo, self._ask(todo, False)):
                _write_cache(self.server.cache_dir, self._key("unpaired-env", "", [s]), [a3m])
                found[s] = [a3m]
        return [found[s][0] for s in seqs]

    def _key(self, mode: str, strategy: str, seqs: list[str]) -> str:
        body = json.dumps({"server": self.server.shown_url, "mode": mode, "strategy": strategy, "seqs": seqs})
        return hashlib.sha256(body.encode()).hexdigest()

    def _ask(self, seqs: list[str], paired: bool) -> list[str]:
        self.stats.requests += 1
        chains = [c for s in seqs for c in self.chains_of.get(s, [])]
        what = f"{'paired MSA' if paired else 'MSA'} of chain{'s' if len(chains) > 1 else ''} {', '.join(chains)}"
        try:
            got = run_client(self.server, seqs, paired)
        except _ServerFailure as e:
            raise InputError(self.server.scrub(f"MSA server {self.server.url} gave no {what}: {e}")) from None
        if len(got) != len(seqs) or not all(isinstance(a, str) and a.startswith(">") for a in got):
            raise InputError(f"MSA server {self.server.shown_url} gave no {what}: malformed reply "
                             "(no alignment for a query)")
        return got


# -- the cache -----------------------------------------------------------------------------------

def _read_cache(folder: Path | None, key: str, count: int) -> list[str] | None:
    """The cached a3m texts under `key`, or None (absent, unreadable or not what was stored)."""
    if folder is None:
        return None
    try:
        got = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(got, list) or len(got) != count or not all(isinstance(a, str) and a.startswith(">") for a in got):
        return None
    return got


def _write_cache(folder: Path | None, key: str, a3ms: list[str]) -> None:
    """Whole or not at all: written under a temporary name, then renamed. A cache that cannot be
    written (read-only, full) only costs a later refetch."""
    if folder is None:
        return
    tmp = folder / f".{key}.tmp{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(a3ms))
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        tmp.unlink(missing_ok=True)


# -- upstream's client under a deadline ----------------------------------------------------------

class _ServerFailure(Exception):
    """Why the server gave no MSA, in a few words."""


_STATUS = re.compile(r"MSA (submission|status check|download) response status: (\d+)")


def run_client(server: MsaServer, seqs: list[str], paired: bool) -> list[str]:
    """Upstream's `run_mmseqs2` on `seqs` in a child process, stopped at `server.timeout_s`."""
    import multiprocessing as mp

    _check_reachable(server)
    ctx = mp.get_context("spawn")  # no fork of a process holding a process group
    messages, sender = ctx.Pipe(duplex=False)  # a pipe: no semaphores left behind by a killed child
    work = Path(tempfile.mkdtemp(prefix="boltz_cp_mmseqs2_"))
    kwargs = {
        "use_env": True, "use_pairing": paired, "pairing_strategy": server.pairing_strategy,
        "host_url": server.url, "msa_server_username": server.username,
        "msa_server_password": server.password, "auth_headers": _auth_headers(server),
    }
    child = ctx.Process(target=_client_process, daemon=True,
                        args=(sender, seqs, str(work / "job"), kwargs, os.getpid(), server.timeout_s))
    child.start()
    sender.close()
    deadline = time.monotonic() + server.timeout_s
    http: tuple[str, str] | None = None
    note = ""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _ServerFailure(f"no reply within {server.timeout_s:g} s (msa_server_timeout_s)"
                                     + (f"; last error: {note}" if note else ""))
            try:
                if not messages.poll(min(left, 0.5)):
                    continue
                kind, *body = messages.recv()
            except EOFError:
                child.join(5)
                raise _ServerFailure(f"the MSA client stopped (exit code {child.exitcode})") from None
            if kind == "ok":
                return body[0]
            if kind == "status":
                http = (body[0], body[1])
            elif kind == "note":
                note = body[0]
            elif kind == "error":
                name, text = body
                if http is not None:
                    raise _ServerFailure(f"HTTP {http[1]} on {http[0]}")
                if "didn't reply with json" in note or name in ("ReadError", "KeyError", "EOFError",
                                                                 "FileNotFoundError", "ValueError", "TypeError"):
                    raise _ServerFailure(f"malformed reply ({name}: {text[:200]})")
                raise _ServerFailure(f"{text[:300]}" + (f" (last error: {note})" if note else ""))
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        messages.close()
        shutil.rmtree(work, ignore_errors=True)


def _auth_headers(server: MsaServer) -> dict[str, str] | None:
    # As upstream's compute_msa builds them: an API key wins over basic auth.
    if not server.api_key_value:
        return None
    return {"Content-Type": "application/json", server.api_key_header or "X-API-Key": server.api_key_value}


def _check_reachable(server: MsaServer) -> None:
    """A closed port or an unknown host fails at once (the client would retry for 30 s)."""
    parts = urlsplit(server.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=min(10.0, server.timeout_s)).close()
    except TimeoutError:
        raise _ServerFailure(f"cannot connect (no answer within {min(10.0, server.timeout_s):g} s)") from None
    except OSError as e:
        raise _ServerFailure(f"cannot connect ({e.strerror or type(e).__name__})") from None


class _Relay(logging.Handler):
    """The client's log records the parent needs: HTTP statuses >= 400 and its last warning."""

    def __init__(self, messages) -> None:
        super().__init__(logging.DEBUG)
        self.messages = messages
        self.put = messages.send

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        m = _STATUS.search(text)
        if m and int(m[2]) >= 400:
            self.put(("status", m[1], m[2]))
        elif record.levelno >= logging.WARNING and not text.startswith("Sleeping"):
            self.put(("note", text.splitlines()[0][:300] if text else ""))


def _client_process(messages, seqs: list[str], prefix: str, kwargs: dict, parent: int, limit_s: float) -> None:
    """The child: upstream's client, its output silenced, the result or the error sent back.
    It ends itself past the deadline or when its parent is gone (killed with no clean-up)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import threading

    from boltz.data.msa.mmseqs2 import logger, run_mmseqs2, tqdm

    tqdm.set_lock(threading.RLock())  # its default lock is a semaphore that a killed child would leak
    threading.Thread(target=_watch, args=(parent, time.monotonic() + limit_s + 5), daemon=True).start()

    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(_Relay(messages))
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        messages.send(("ok", run_mmseqs2(seqs, prefix, **kwargs)))
    except BaseException as e:  # noqa: BLE001 -- any failure is the server's reply, told in a line
        messages.send(("error", type(e).__name__, str(e).splitlines()[0] if str(e) else ""))


def _watch(parent: int, deadline: float) -> None:
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(1.0)
    os._exit(1)
