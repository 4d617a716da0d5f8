"""Pre-flight planner: predicted per-rank memory, time and ring traffic of the CP Boltz-2 forward
on any R x C mesh (`boltz_cp plan`; `predict` refuses runs it says cannot fit).

    model.py    architecture / run (`Hyper`, read from the `full` preset), mesh geometry, dtypes
    memory.py   per-stage inventory of the tensors alive at each peak (calibrated terms labelled)
    timing.py   FLOPs, bytes and ring traffic per stage; machine rates (H100 assumed, CPU fitted)
    planner.py  every mesh a GPU count allows, fit against a GPU's memory, recommendation
    inputs.py   an input's tokens, atoms and MSA depth through the prediction's data path

benchmarks/model.py calibrates it and checks it against bench reports.
"""

from boltz_cp.plan.memory import (
    AS_BUILT,
    KERNELS,
    MemOptions,
    memory_summary,
    stage_memory,
)
from boltz_cp.plan.model import (
    BOLTZ2,
    GB,
    MIB,
    Dtypes,
    Geometry,
    Hyper,
    geometry,
    parameter_count,
    weights_bytes,
)
from boltz_cp.plan.planner import (
    RUNTIME_ALLOWANCE_BYTES,
    MeshPlan,
    Option,
    RunSize,
    meshes,
    options,
    plan_mesh,
    recommend,
    smallest_fit,
)
from boltz_cp.plan.timing import (
    CPU_HERE,
    H100,
    Machine,
    h100_variant,
    ring_traffic,
    sample_time,
    stage_time,
)

__all__ = [
    "AS_BUILT",
    "BOLTZ2",
    "CPU_HERE",
    "GB",
    "H100",
    "KERNELS",
    "MIB",
    "RUNTIME_ALLOWANCE_BYTES",
    "Dtypes",
    "Geometry",
    "Hyper",
    "Machine",
    "MemOptions",
    "MeshPlan",
    "Option",
    "RunSize",
    "geometry",
    "h100_variant",
    "memory_summary",
    "meshes",
    "options",
    "parameter_count",
    "plan_mesh",
    "recommend",
    "ring_traffic",
    "sample_time",
    "smallest_fit",
    "stage_memory",
    "stage_time",
    "weights_bytes",
]
