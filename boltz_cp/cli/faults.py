"""Naming the rank that failed, and the little a run shares across meshes, via the c10d store.

A rank that fails on its own (a BoltzCPError, out of memory, a bug) writes one line into the
job's store before it tears its process group down: "rank R (mesh d, tile (r, c)) failed on
input NAME: message". Under torchrun the store lives in the agent, so the line outlives the
worker. The ranks that then lose contact with it, or that the launcher stops, read the line and
put it in their own one-line error. Naming is best effort: every access is short and a store
error only drops the name, so it can never hold up an exit.

The same store carries, for a multi-rank run, the pending inputs (decided by global rank 0 so
that every rank assigns the same inputs to the same mesh), the MSA server's answers (cli/msa.py)
and each mesh's failures at the end.
Those waits poll the store instead of blocking in it (SIGTERM is handled at once) and stop as
soon as any rank of the job has failed; the final one has no deadline, because meshes finish
their inputs at different times.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from typing import Any

from boltz_cp.errors import RankFailure

READ_WAIT_S = 3.0  # how long a rank that lost contact waits for the failing rank's record
POLL_S = 0.2


@dataclass
class _Job:
    store: Any
    prefix: str
    rank: int
    dp: int
    dp_index: int
    coord: tuple[int, int]


_job: _Job | None = None
_input: str | None = None
_runs = 0


def attach(store, *, rank: int, dp: int = 1, dp_index: int = 0, coord: tuple[int, int] = (0, 0),
           prefix: str = "boltz_cp/") -> None:
    """Use `store` (keys under `prefix`) for this rank's records; None: no store, records dropped."""
    global _job
    _job = None if store is None else _Job(store, prefix, rank, dp, dp_index, tuple(coord))


def attach_mesh(mesh) -> None:
    """The default process group's store, for a multi-rank run (after `CPMesh.build`)."""
    import torch.distributed as dist

    global _runs
    _runs += 1  # keys per run: a process that predicts twice never reads an old run's keys
    store = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 -- no store: ranks are still named by the launcher
            store = None
    attach(store, rank=mesh.rank, dp=mesh.dp, dp_index=mesh.dp_index, coord=mesh.coord,
           prefix=f"boltz_cp/{_runs}/")


def set_input(name: str | None) -> None:
    """The input this rank is working on (named in its failure record)."""
    global _input
    _input = name


def is_communication_error(e: BaseException) -> bool:
    """A failure of the link to another rank (it died, hung or closed its connection)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or "/gloo/" in text or "NCCL" in text


def _one_line(e: BaseException) -> str:
    from boltz_cp.errors import BoltzCPError

    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(e, BoltzCPError):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text[:300]


def on_failure(e: BaseException) -> None:
    """Called with the exception that ends this rank's run: its own failures are recorded for
    the others; every failure raises the job's abort flag (waiting meshes stop)."""
    if _job is None:
        return
    own = not (isinstance(e, (RankFailure, KeyboardInterrupt)) or is_communication_error(e))
    if own:
        try:  # the launcher's SIGTERM must not replace this failure (main._report ignores it too)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        record_failure(_one_line(e))
    try:
        _job.store.add(_job.prefix + "aborted", 1)
    except Exception:  # noqa: BLE001
        pass


def record_failure(message: str) -> None:
    """Write this rank's failure record; the first record of a mesh (and of the job) wins."""
    job = _job
    if job is None:
        return
    body = json.dumps({"rank": job.rank, "dp": job.dp, "dp_index": job.dp_index, "coord": list(job.coord),
                       "input": _input, "message": message})
    try:
        for key in (f"failure/{job.dp_index}", "failure/first"):
            if job.store.add(job.prefix + key + "/count", 1) == 1:
                job.store.set(job.prefix + key, body)
    except Exception:  # noqa: BLE001 -- best effort
        pass


def format_record(body: str | bytes) -> str:
    r = json.loads(body)
    where = f"mesh {r['dp_index']}, " if r.get("dp", 1) > 1 else ""
    on = f" on input {r['input']}" if r.get("input") else ""
    return f"rank {r['rank']} ({where}tile ({r['coord'][0]}, {r['coord'][1]})) failed{on}: {r['message']}"


def failed_rank(wait_s: float = READ_WAIT_S) -> str | None:
    """The failing rank's record (my mesh's first, else the job's first), waiting at most
    `wait_s` for it to appear; None when there is none or the store cannot be read."""
    job = _job
    if job is None:
        return None
    keys = [job.prefix + f"failure/{job.dp_index}", job.prefix + "failure/first"]
    deadline = time.monotonic() + wait_s
    try:
        while True:
            for key in keys:
                if job.store.check([key]):
                    return format_record(job.store.get(key))
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)
    except Exception:  # noqa: BLE001 -- store gone or unreadable: no name
        return None


def _aborted(job: _Job) -> bool:
    return job.store.check([job.prefix + "aborted"])


def _stop_for_abort() -> RankFailure:
    record = failed_rank(wait_s=READ_WAIT_S)
    return RankFailure(f"stopped: {record}" if record else
                       "stopped: another rank failed or stopped; its own message or the launcher's summary names it")


def _wait(keys: list[str], deadline_s: float | None, what: str) -> list[bytes]:
    """Poll until every key is set (then their values), any rank aborted (RankFailure naming
    the failure), or `deadline_s` passed."""
    job = _job
    assert job is not None
    start = time.monotonic()
    try:
        while not job.store.check(keys):
            if _aborted(job):
                raise _stop_for_abort()
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                raise RankFailure(f"lost contact with another rank: no {what} after {deadline_s:g} s")
            time.sleep(POLL_S)
        return [job.store.get(k) for k in keys]
    except RankFailure:
        raise
    except Exception as e:  # noqa: BLE001 -- the store itself is gone
        raise RankFailure(f"lost contact with the job's store while waiting for {what} ({_one_line(e)})") from None


def share_from_rank0(value: Any, deadline_s: float, name: str = "shared") -> Any:
    """Global rank 0's `value` (JSON) on every rank that asks; without a store (one process) the
    value. Each `name` is set once per job."""
    job = _job
    if job is None:
        return value
    key = job.prefix + name
    if job.rank == 0:
        try:
            job.store.set(key, json.dumps(value))
        except Exception as e:  # noqa: BLE001
            raise RankFailure(f"cannot write to the job's store ({_one_line(e)})") from None
    return json.loads(_wait([key], deadline_s, "word from rank 0")[0])


def gather_meshes(mine: Any, is_writer: bool) -> list[Any]:
    """Every mesh writer's `mine` (JSON), in mesh order, on every rank of the job; no deadline
    (a mesh may still be folding), but any failed rank stops the wait."""
    job = _job
    if job is None:
        return [mine]
    if is_writer:
        try:
            job.store.set(job.prefix + f"result/{job.dp_index}", json.dumps(mine))
        except Exception as e:  # noqa: BLE001
            raise RankFailure(f"cannot write to the job's store ({_one_line(e)})") from None
    keys = [job.prefix + f"result/{d}" for d in range(job.dp)]
    return [json.loads(v) for v in _wait(keys, None, "results from every mesh")]
