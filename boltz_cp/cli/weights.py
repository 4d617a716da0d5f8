"""Weights and the residue library on first use, where `boltz predict` downloads them.

Upstream's `download_boltz2` fetches `mols.tar` (extracted to `<cache>/mols`),
`boltz2_conf.ckpt` and `boltz2_aff.ckpt` into the cache from its URLs (`boltz.main.MOL_URL`,
`BOLTZ2_URL_WITH_FALLBACK`, `BOLTZ2_AFFINITY_URL_WITH_FALLBACK`, tried in order). Here the same
files come from the same URLs, or from `weights_url` (a mirror serving `<weights_url>/<name>`),
but only what the run needs: a checkpoint whose setting is null and whose cache file is missing
(the affinity one only if an input asks for affinity), and `mols.tar` only while `<cache>/mols`
does not exist.

One rank per node (LOCAL_RANK 0) downloads; every rank waits at a barrier of the whole world
(so `timeout_s` must cover the download). A file is written under a temporary name in the
cache, verified (all the bytes the server announced; a checkpoint is a torch zip archive; the
tar extracts whole) and only then renamed into place, so a cut-off download leaves nothing a
later run trusts. A failed download is one warning line; the run then stops with the usual
message naming the missing file and the ways to get it (offline runs keep that message).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import torch.distributed as dist

from boltz_cp.errors import BoltzCPError

# upstream's names in the cache (boltz.main.download_boltz2)
MOLS_TAR, CHECKPOINT_NAME, AFFINITY_CHECKPOINT_NAME = "mols.tar", "boltz2_conf.ckpt", "boltz2_aff.ckpt"
SOCKET_TIMEOUT_S = 60  # per blocking socket operation, not the whole download
_CHUNK = 1 << 20


class DownloadError(Exception):
    pass


def upstream_urls(name: str) -> list[str]:
    """Where `boltz predict` gets `name` (its own constants, fallbacks in its order)."""
    from boltz import main

    return {MOLS_TAR: [main.MOL_URL], CHECKPOINT_NAME: list(main.BOLTZ2_URL_WITH_FALLBACK),
            AFFINITY_CHECKPOINT_NAME: list(main.BOLTZ2_AFFINITY_URL_WITH_FALLBACK)}[name]


def urls_for(name: str, mirror: str | None) -> list[str]:
    return [f"{mirror.rstrip('/')}/{name}"] if mirror else upstream_urls(name)


def needed(cfg, cache: Path, affinity: bool) -> list[str]:
    """The files this run would download (names in the cache), in upstream's order."""
    names = []
    if not (cache / "mols").exists():
        names.append(MOLS_TAR)
    if not cfg.checkpoint and not (cache / CHECKPOINT_NAME).exists():
        names.append(CHECKPOINT_NAME)
    if affinity and not cfg.affinity_checkpoint and not (cache / AFFINITY_CHECKPOINT_NAME).exists():
        names.append(AFFINITY_CHECKPOINT_NAME)
    return names


def wants_affinity(files: list[Path]) -> bool:
    """Whether an input asks for affinity (a file that does not parse fails later, on its own)."""
    from boltz_cp.data.affinity import affinity_binder

    def asks(path: Path) -> bool:
        try:
            return affinity_binder(path) is not None
        except BoltzCPError:
            return False

    return any(asks(p) for p in files)


def _download(url: str, tmp: Path) -> None:
    with urllib.request.urlopen(url, timeout=SOCKET_TIMEOUT_S) as response, tmp.open("wb") as f:  # noqa: S310
        announced = response.headers.get("Content-Length")
        got = 0
        while chunk := response.read(_CHUNK):
            f.write(chunk)
            got += len(chunk)
    if announced is not None and got != int(announced):
        raise DownloadError(f"cut off after {got} of {announced} bytes")


def _check_checkpoint(tmp: Path) -> None:
    if not zipfile.is_zipfile(tmp):
        raise DownloadError("not a torch checkpoint (zip archive)")


def _extract_mols(tar: Path, cache: Path) -> None:
    """`mols.tar` (a `mols/` folder, as upstream extracts it into the cache) into `<cache>/mols`."""
    staging = cache / f".mols.part-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(tar) as archive:
            archive.extractall(staging, filter="data")
        if not (staging / "mols").is_dir():
            raise DownloadError(f"{tar} holds no mols/ folder")
        if not (cache / "mols").exists():
            os.replace(staging / "mols", cache / "mols")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DownloadError(f"{tar} does not extract: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(name: str, cache: Path, mirror: str | None, log) -> None:
    """Download `name` into `cache` (verified, then renamed); DownloadError naming every URL tried."""
    dest = cache / name
    tmp = cache / f".{name}.part-{os.getpid()}"
    errors = []
    for url in urls_for(name, mirror):
        log(f"downloading {name} from {url} into {cache}")
        try:
            _download(url, tmp)
            if name != MOLS_TAR:
                _check_checkpoint(tmp)
            os.replace(tmp, dest)
            break
        except (OSError, ValueError, DownloadError) as e:  # URLError, HTTPError, IncompleteRead are OSErrors
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    else:
        raise DownloadError("; ".join(errors))
    if name == MOLS_TAR and not (cache / "mols").exists():
        try:
            _extract_mols(dest, cache)
        except DownloadError:
            dest.unlink(missing_ok=True)  # not trusted: the next run downloads it again
            raise


def ensure_downloads(cfg, cache: Path, affinity: bool, local_rank: int, log,
                     only: tuple[str, ...] | None = None) -> list[str]:
    """Every rank of the world: the node's LOCAL_RANK 0 downloads what `needed` lists (of `only`,
    when given), the others wait. Returns the names this rank downloaded; failures are warnings
    (see the module doc)."""
    done = []
    if local_rank == 0:
        for name in needed(cfg, cache, affinity):
            if only is not None and name not in only:
                continue
            cache.mkdir(parents=True, exist_ok=True)
            try:
                fetch(name, cache, cfg.weights_url, log)
                done.append(name)
            except DownloadError as e:
                log.warn(f"WARNING: could not download {name}: {e}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return done
