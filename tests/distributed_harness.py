"""Multi-rank tests on gloo/CPU with reused worker processes.

Spawning P processes costs ~2 s of imports (torch, DTensor) each: 3-8 s for 4 ranks and
8-16 s for 9 on 2 cores, depending on load. So each world size gets one pool of workers,
started lazily and kept for the whole pytest session; a 4-rank call on a tiny tensor then
costs a few milliseconds.

Usage (``fn`` must be a module-level function, pickled by reference):

    def _check(mesh, x):                 # runs on every rank
        return mesh.coord, x.sum()

    def test_something(run_on_mesh):     # fixture from conftest.py
        results = run_on_mesh(_check, 2, 2, torch.ones(3))   # one result per rank
        assert results[3][0] == (1, 1)

``run_on_world(fn, world_size, ...)`` calls ``fn(*args, **kwargs)`` without building a mesh
(for tests of mesh construction itself).

Workers: "spawn" context, ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` (two OpenMP
threads per rank under oversubscription were 10-25x slower), a `FileStore` in a fresh temp
dir (never a fixed port), one gloo process group per worker with a short timeout. Each call
resets `boltz_cp.distributed.comm` counters first. A CPMesh is cached per (rows, cols).

Arguments and results travel pickled by value (tensors are copied); ``timeout`` is the
harness's own keyword, so ``fn`` cannot take a kwarg of that name. Workers live on between
calls (RNG state, module globals): seed explicitly inside ``fn``.

Failure handling, so that pytest never stalls:
- an exception on any rank is re-raised in the parent as `RemoteError`, naming the rank and
  carrying the remote traceback; the workers then rebuild their process group (a fresh
  store), since an aborted exchange may have left unmatched messages behind (a test pins
  this). Ranks left waiting for the failed one get ERROR_GRACE_S, then the pool is killed;
- past the deadline, or if a worker dies, the pool is killed (re-created on next use) and
  `DistributedHang` is raised naming the ranks that did not answer.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta

PG_TIMEOUT_S = 30.0
START_TIMEOUT_S = 180.0
# After one rank failed, how long the others get to finish before the pool is killed.
ERROR_GRACE_S = 3.0


class RemoteError(RuntimeError):
    """An exception raised by ``fn`` on some rank(s); ``.rank`` is the lowest failing rank."""

    def __init__(self, message: str, rank: int, exc_type: str, remote_traceback: str):
        super().__init__(message)
        self.rank, self.exc_type, self.remote_traceback = rank, exc_type, remote_traceback


class DistributedHang(AssertionError):
    """Some rank did not finish before the deadline (or died); the pool was killed."""


# -- worker side -----------------------------------------------------------------------------

def _init_pg(rank: int, world_size: int, store_path: str, pg_timeout_s: float) -> None:
    import torch.distributed as dist

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=pg_timeout_s))


def _worker_main(rank: int, world_size: int, store_path: str, pg_timeout_s: float,
                 conn) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from boltz_cp.distributed.comm import reset_comm_counters
    from boltz_cp.distributed.mesh import CPMesh

    _init_pg(rank, world_size, store_path, pg_timeout_s)
    conn.send_bytes(pickle.dumps(("ready", rank, None)))
    meshes: dict[tuple[int, int], CPMesh] = {}
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # parent gone
            return
        if msg[0] == "stop":
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # skip interpreter teardown of torch: seconds per worker
        if msg[0] == "reset":
            # Fresh process group: drops any unmatched message of an aborted call.
            meshes.clear()
            dist.destroy_process_group()
            _init_pg(rank, world_size, msg[1], pg_timeout_s)
            conn.send_bytes(pickle.dumps(("ready", rank, None)))
            continue
        _, call_id, rows, cols, payload = msg
        try:
            fn, args, kwargs = pickle.loads(payload)
            reset_comm_counters()
            if rows is None:
                out = fn(*args, **kwargs)
            else:
                key = (rows, cols)
                if key not in meshes:
                    meshes[key] = CPMesh.build(rows, cols)
                out = fn(meshes[key], *args, **kwargs)
            reply = pickle.dumps(("ok", rank, (call_id, out)))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            reply = pickle.dumps(("error", rank, (call_id, type(e).__name__, str(e),
                                                  traceback.format_exc())))
        conn.send_bytes(reply)


# -- parent side -----------------------------------------------------------------------------

class _Pool:
    """``world_size`` spawned workers joined in one gloo process group."""

    def __init__(self, world_size: int, pg_timeout_s: float = PG_TIMEOUT_S):
        self.world_size = world_size
        self.tmpdir = tempfile.mkdtemp(prefix=f"boltz_cp_pool{world_size}_")
        self._stores = itertools.count()
        self._calls = itertools.count()
        ctx = mp.get_context("spawn")
        store = self._store_path()
        self.conns, self.procs = [], []
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # read at child start-up
        try:
            for rank in range(world_size):
                parent_conn, child_conn = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_worker_main, daemon=True,
                                args=(rank, world_size, store, pg_timeout_s, child_conn),
                                name=f"cp-worker-{world_size}-{rank}")
                p.start()
                child_conn.close()
                self.conns.append(parent_conn)
                self.procs.append(p)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._await_ready(START_TIMEOUT_S, "start")

    def _store_path(self) -> str:
        return os.path.join(self.tmpdir, f"store{next(self._stores)}")

    def _await_ready(self, timeout: float, what: str) -> None:
        replies = self._collect(time.monotonic() + timeout)
        missing = [r for r in range(self.world_size)
                   if r not in replies or replies[r][0] != "ready"]
        if missing:
            self.kill()
            raise DistributedHang(f"pool of {self.world_size}: ranks {missing} did not {what} "
                                  f"within {timeout:.0f} s (see their stderr above)")

    def _collect(self, deadline: float, grace: float | None = None) -> dict[int, tuple]:
        """Replies by rank until all arrived, the deadline passed, or a worker died."""
        replies: dict[int, tuple] = {}
        pending = {self.conns[r]: r for r in range(self.world_size)}
        sentinels = {self.procs[r].sentinel: r for r in range(self.world_size)}
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            ready = mp.connection.wait(list(pending) + list(sentinels), timeout=deadline - now)
            for obj in ready:
                if obj in sentinels:
                    rank = sentinels.pop(obj)
                    if self.conns[rank] in pending and not self.conns[rank].poll():
                        del pending[self.conns[rank]]
                        replies[rank] = ("died", rank, self.procs[rank].exitcode)
                        if grace is not None:
                            deadline = min(deadline, time.monotonic() + grace)
                    continue
                rank = pending.pop(obj)
                try:
                    replies[rank] = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):
                    replies[rank] = ("died", rank, None)
                if replies[rank][0] in ("error", "died") and grace is not None:
                    deadline = min(deadline, time.monotonic() + grace)
        return replies

    def call(self, fn, rows, cols, args, kwargs, timeout: float) -> list:
        try:
            payload = pickle.dumps((fn, args, kwargs))
        except Exception as e:
            raise TypeError(f"cannot send {fn!r} to the workers (fn must be a module-level "
                            f"function; args picklable): {e}") from e
        call_id = next(self._calls)
        msg = pickle.dumps(("call", call_id, rows, cols, payload))
        t0 = time.monotonic()
        try:
            for c in self.conns:
                c.send_bytes(msg)
        except OSError as e:
            self.kill()
            raise DistributedHang(f"pool of {self.world_size}: a worker is gone ({e}); the "
                                  f"pool was killed and is re-created on next use") from e
        replies = self._collect(t0 + timeout, grace=ERROR_GRACE_S)
        name = getattr(fn, "__qualname__", repr(fn))
        errors = sorted((r, m) for r, m in replies.items() if m[0] == "error")
        died = sorted(r for r, m in replies.items() if m[0] == "died")
        silent = [r for r in range(self.world_size) if r not in replies]
        stuck = ""
        if silent or died:
            self.kill()
            stuck = ((f"ranks {silent} did not finish within "
                      f"{timeout if not errors else ERROR_GRACE_S:g} s" if silent else "")
                     + ("; " if silent and died else "")
                     + (f"ranks {died} died" if died else "")
                     + f" (elapsed {time.monotonic() - t0:.1f} s); the pool of "
                       f"{self.world_size} was killed and is re-created on next use")
        elif errors:
            self.reset()
        if errors:
            r, m = errors[0]
            _, exc_type, text, tb = m[2]
            others = [e[0] for e in errors[1:]]
            raise RemoteError(
                f"{name}: rank {r} raised {exc_type}: {text}"
                + (f" (ranks {others} raised too)" if others else "")
                + (f"; then {stuck}" if stuck else "")
                + f"\n--- traceback on rank {r} ---\n{tb}", r, exc_type, tb)
        if stuck:
            raise DistributedHang(f"hang: {name} on {self.world_size} ranks: {stuck}")
        return [replies[r][2][1] for r in range(self.world_size)]

    def reset(self) -> None:
        msg = pickle.dumps(("reset", self._store_path()))
        try:
            for c in self.conns:
                c.send_bytes(msg)
        except OSError:
            self.kill()
            return
        try:
            self._await_ready(PG_TIMEOUT_S, "rebuild the process group")
        except DistributedHang:
            pass  # already killed; the caller's RemoteError matters more

    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        self._close()

    def shutdown(self) -> None:
        stop = pickle.dumps(("stop",))
        for c, p in zip(self.conns, self.procs):
            if p.is_alive():
                try:
                    c.send_bytes(stop)
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def _close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns, self.procs = [], []
        shutil.rmtree(self.tmpdir, ignore_errors=True)


_POOLS: dict[int, _Pool] = {}


def _pool(world_size: int) -> _Pool:
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        pool = _POOLS[world_size] = _Pool(world_size)
    return pool


def _run(world_size, fn, rows, cols, args, kwargs, timeout):
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    pool = _pool(world_size)
    try:
        return pool.call(fn, rows, cols, args, kwargs, timeout)
    finally:
        if not pool.alive():
            _POOLS.pop(world_size, None)


def run_on_mesh(fn, rows: int, cols: int, *args, timeout: float = 60, **kwargs) -> list:
    """Run ``fn(mesh, *args, **kwargs)`` on each rank of a rows x cols CPMesh; results by rank.

    Uses the pool of rows*cols workers. Raises `RemoteError` if fn raised on any rank and
    `DistributedHang` if some rank did not finish within ``timeout`` seconds.
    """
    return _run(rows * cols, fn, rows, cols, args, kwargs, timeout)


def run_on_world(fn, world_size: int, *args, timeout: float = 60, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on each of ``world_size`` ranks (process group only)."""
    return _run(world_size, fn, None, None, args, kwargs, timeout)


def shutdown_pools() -> None:
    """Stop every pool (session end)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.shutdown()


atexit.register(shutdown_pools)
