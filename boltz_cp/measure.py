"""Measuring a run: per-stage wall and CPU time and peak memory of a model's forward.

Used by `python -m boltz_cp.bench` (boltz_cp/cli/bench.py) and the CPU mesh benchmarks
(benchmarks/_common.py). Memory meters:
  CPU: bytes the C heap has handed out (glibc mallinfo2), sampled after every aten op by
       `HeapMeter` (a TorchDispatchMode); plus the process's peak RSS (VmHWM).
  CUDA: torch's allocator statistics (`CudaMeter`).
`StageRecorder` brackets nested stages (the parent's peak includes its children's);
`hook_stages` opens and closes them from forward hooks on a Boltz-2 model's submodules;
`aggregate` merges every rank's records into one row per stage.
"""

from __future__ import annotations

import ctypes
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_LIBC = None


def heap_in_use() -> int:
    """Bytes the C heap has handed out now (small blocks plus mmapped ones); glibc only."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallinfo2.restype = _MallInfo2
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def rss_peak() -> int:
    """The process's peak resident set size in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _data_ptrs(tree) -> set[int]:
    """Storage addresses of the dense tensors in a pytree (sparse ones have no storage)."""
    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree)
            if isinstance(t, torch.Tensor) and t.layout == torch.strided}


def launches_kernel(func, args, kwargs, out) -> bool:
    """Whether an aten op would launch a device kernel: it writes in place, or returns a tensor
    with storage of its own (not a view, alias or no-op cast of an input, not an allocation
    alone, not a Python value such as promote_types' dtype)."""
    if func._schema.is_mutable:
        return True
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not outs or func.__name__.startswith("empty"):
        return False
    if any(t.layout != torch.strided for t in outs):
        return True
    return not _data_ptrs(outs) <= _data_ptrs((args, kwargs))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched in the block (`ops`, what eager dispatch pays for) and,
    of those, the ones that launch a kernel (`launches`, see `launches_kernel`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.launches += launches_kernel(func, args, kwargs or {}, out)
        return out


class HeapMeter(OpCounter):
    """CPU: within the block, `peak()` is the largest heap_in_use() seen after any aten op since
    the last `reset()`; it counts ops and kernel launches as `OpCounter`."""

    kind = "cpu heap"

    def __init__(self) -> None:
        super().__init__()
        self._peak = heap_in_use()
        self.max_seen = self._peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        now = heap_in_use()
        if now > self._peak:
            self._peak = now
        return out

    def now(self) -> int:
        return heap_in_use()

    def peak(self) -> int:
        return max(self._peak, heap_in_use())

    def reset(self) -> None:
        self.max_seen = max(self.max_seen, self.peak())
        self._peak = heap_in_use()


class CudaMeter:
    """CUDA: torch's allocator statistics on the current device."""

    kind = "cuda allocated"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        torch.cuda.reset_peak_memory_stats(device)
        self.max_seen = torch.cuda.max_memory_allocated(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def now(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset(self) -> None:
        self.max_seen = max(self.max_seen, self.peak())
        torch.cuda.reset_peak_memory_stats(self.device)





@dataclass
class _Open:
    name: str
    t0: float
    cpu0: float
    start: int
    peak: int
    ref: int | None
    launches: int | None  # the meter's kernel launches when the stage began


@dataclass
class StageRecorder:
    """Nested stages timed by wall clock, each with the peak memory seen while it was open.

    `begin(name)` / `end(name)` bracket a stage (hooks call them); stages may nest (the parent's
    peak includes the child's). A record: stage, seconds, peak bytes above `ref` (the bytes in use
    when the forward began, for stages inside it; the stage's own start bytes otherwise).
    """

    meter: Any
    sync: Callable[[], None]
    log: Callable[[str], None] | None = None
    records: list[dict] = field(default_factory=list)
    ref: int | None = None  # set while the forward runs
    t_origin: float = field(default_factory=time.perf_counter)
    _open: list[_Open] = field(default_factory=list)

    def begin(self, name: str) -> None:
        self.sync()
        peak = self.meter.peak()
        for o in self._open:
            o.peak = max(o.peak, peak)
        self.meter.reset()
        now = self.meter.now()
        self._open.append(_Open(name, time.perf_counter(), time.process_time(), now, now, self.ref,
                                getattr(self.meter, "launches", None)))

    def end(self, name: str) -> None:
        self.sync()
        t1, cpu1 = time.perf_counter(), time.process_time()
        o = self._open.pop()
        if o.name != name:
            raise RuntimeError(f"bench: stage {name!r} ended while {o.name!r} was open")
        peak = max(o.peak, self.meter.peak())
        if self._open:
            self._open[-1].peak = max(self._open[-1].peak, peak)
        ref = o.start if o.ref is None else o.ref
        self.records.append({"stage": name, "start": o.t0 - self.t_origin, "seconds": t1 - o.t0,
                             "cpu_seconds": cpu1 - o.cpu0, "peak_bytes": peak - ref,
                             "launches": None if o.launches is None else self.meter.launches - o.launches,
                             "depth": len(self._open)})
        if self.log is not None and len(self._open) <= 1:
            self.log(f"{name}: {t1 - o.t0:.2f} s, peak {(peak - ref) / MIB:.1f} MiB")

    def add(self, name: str, t0: float, seconds: float, cpu_seconds: float) -> None:
        """A stage timed outside the recorder (no memory figure)."""
        self.records.append({"stage": name, "start": t0 - self.t_origin, "seconds": seconds,
                             "cpu_seconds": cpu_seconds, "peak_bytes": None, "depth": 0})
        if self.log is not None:
            self.log(f"{name}: {seconds:.2f} s")

    def stage(self, name: str):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.begin(name)

            def __exit__(self, exc_type, *exc):
                if exc_type is None:
                    rec.end(name)

        return _Ctx()


# Submodule -> stage name; called once per forward unless noted.
MODULE_STAGES = (
    ("input_embedder", "trunk: input embedder"),
    ("template_module", "trunk: templates"),  # per recycle
    ("msa_module", "trunk: MSA module"),  # per recycle
    ("pairformer_module", "trunk: pairformer"),  # per recycle
    ("distogram_module", "trunk: distogram"),
    ("diffusion_conditioning", "diffusion conditioning"),
    ("structure_module.score_model", "diffusion step (score model)"),  # per step and sample chunk
    ("bfactor_module", "b-factor head"),
    ("confidence_module", "confidence"),
    ("confidence_module.pairformer_stack", "confidence: pairformer"),
    ("confidence_module.confidence_heads", "confidence: heads"),
)
TRUNK = "trunk (embedder, recycles, distogram)"
RECYCLE = "trunk: recycle (templates + MSA + pairformer)"
SAMPLING = "sampling (all steps)"


def hook_stages(model, rec: StageRecorder) -> Callable[[], None]:
    """Register the stage hooks on `model`; returns a function that removes them."""
    handles = []
    undo = []

    def attach(module, name):
        handles.append(module.register_forward_pre_hook(lambda _m, _a: rec.begin(name)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: rec.end(name)))

    first_of_recycle = "template_module" if getattr(model, "use_templates", False) else "msa_module"
    for path, name in MODULE_STAGES:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is None:
            continue
        if path == "input_embedder":  # the trunk opens with the embedder
            handles.append(module.register_forward_pre_hook(lambda _m, _a: rec.begin(TRUNK)))
        if path == first_of_recycle:  # the recycle opens before its first module
            handles.append(module.register_forward_pre_hook(lambda _m, _a: rec.begin(RECYCLE)))
        attach(module, name)
        if path == "pairformer_module":  # ... and closes after the pairformer
            handles.append(module.register_forward_hook(lambda _m, _a, _o: rec.end(RECYCLE)))
        if path == "distogram_module":  # the trunk closes after the distogram
            handles.append(module.register_forward_hook(lambda _m, _a, _o: rec.end(TRUNK)))

    sm = model.structure_module
    sample = sm.sample

    def timed_sample(*args, **kwargs):
        with rec.stage(SAMPLING):
            return sample(*args, **kwargs)

    sm.sample = timed_sample
    undo.append(lambda: delattr(sm, "sample"))

    def remove() -> None:
        for h in handles:
            h.remove()
        for u in undo:
            u()

    return remove




def aggregate(every: list[dict]) -> list[dict]:
    """Per stage (in order of first start on rank 0): calls, seconds (rank 0 and max over
    ranks), peak bytes (max over ranks) and each rank's peak."""
    first_start: dict[str, float] = {}
    table: dict[str, dict] = {}
    for r in every:
        for rec in r["records"]:
            row = table.setdefault(rec["stage"], {"stage": rec["stage"], "depth": rec["depth"],
                                                  "per_rank": {}})
            if r["rank"] == every[0]["rank"] or rec["stage"] not in first_start:
                first_start[rec["stage"]] = min(first_start.get(rec["stage"], rec["start"]), rec["start"])
            mine = row["per_rank"].setdefault(r["rank"], {"calls": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                                          "peak_bytes": None, "launches": None})
            mine["calls"] += 1
            mine["seconds"] += rec["seconds"]
            mine["cpu_seconds"] += rec.get("cpu_seconds") or 0.0
            if rec["peak_bytes"] is not None:
                mine["peak_bytes"] = max(mine["peak_bytes"] or 0, rec["peak_bytes"])
            if rec.get("launches") is not None:
                mine["launches"] = (mine["launches"] or 0) + rec["launches"]
    rows = []
    for name in sorted(first_start, key=lambda k: (first_start[k], -len(k))):
        row = table[name]
        ranks = row["per_rank"]
        first = ranks.get(0) or next(iter(ranks.values()))
        peaks = [v["peak_bytes"] for v in ranks.values() if v["peak_bytes"] is not None]
        rows.append({
            "stage": name, "depth": row["depth"], "calls": first["calls"],
            "seconds_rank0": first["seconds"], "seconds_max": max(v["seconds"] for v in ranks.values()),
            "seconds_per_call": first["seconds"] / max(1, first["calls"]),
            "cpu_seconds_rank0": first["cpu_seconds"],
            "cpu_seconds_max": max(v["cpu_seconds"] for v in ranks.values()),
            "launches_rank0": first["launches"],
            "peak_bytes_max": max(peaks) if peaks else None,
            "peak_bytes_per_rank": {str(k): v["peak_bytes"] for k, v in sorted(ranks.items())},
        })
    return rows
