"""Run one parity case on a mesh: upstream module vs its CP twin, same weights, same inputs.

A case (registered with `@register`) says how to build the upstream module, its CP twin, the
full inputs, and how to run each side; the runner owns weights, dtypes and the verdict.

Verdict:
- float64: every output passes `torch.testing.assert_close` at its default float64
  tolerance against upstream run in true float64 (`fp64_reference`).
- float32: errors against that float64 oracle; the CP run's error percentiles (p50, p90, p99)
  must be at most 1.25x the serial float32 run's and its max error at most 2x. Reassociated
  sums (ring order, online softmax) change round-off, not its magnitude.
- bf16-mixed: float32 weights and inputs under bf16 autocast on both sides (as upstream's
  Lightning `bf16-mixed` runs), judged like float32. A case whose serial side cannot run in
  it says why (SKIP: neither a pass nor a failure).
Inputs and outputs are full tensors of N tokens on every rank (gathered for the comparison).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from boltz_cp.distributed import CPMesh, TokenLayout
from boltz_cp.errors import ConfigError
from boltz_cp.parity.reference import fp64_reference, randomize_

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class LayerWidths:
    """Layer widths for parity runs: `tiny` for CI, `full` = Boltz-2's inference widths."""

    token_s: int
    token_z: int
    num_heads: int  # attention with pair bias on the single track
    pairwise_num_heads: int  # triangle attention
    pairwise_head_width: int
    num_blocks: int  # pairformer blocks for the module-level cases


LAYER_WIDTHS = {
    "tiny": LayerWidths(token_s=32, token_z=16, num_heads=4, pairwise_num_heads=2, pairwise_head_width=8, num_blocks=2),
    "full": LayerWidths(token_s=384, token_z=128, num_heads=16, pairwise_num_heads=4, pairwise_head_width=32, num_blocks=2),
}


class Case(Protocol):
    def build(self, preset: LayerWidths) -> nn.Module:
        """The upstream module (weights are randomised by the runner)."""

    def cp_twin(self, upstream: nn.Module) -> nn.Module:
        """The CP module holding the same weights (loaded with strict=True)."""

    def inputs(self, n: int, preset: LayerWidths, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Full float64 inputs for N tokens (masks with real zeros). A case built on a real
        input may ignore n and define ``num_tokens(inputs) -> N`` instead."""

    def serial(self, module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upstream forward on full tensors."""

    def cp(self, module: nn.Module, inputs: dict[str, torch.Tensor], layout: TokenLayout) -> dict[str, torch.Tensor]:
        """Shard the inputs, run the CP module, gather the outputs to full N on every rank."""


CASES: dict[str, Case] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        CASES[name] = cls()
        return cls

    return deco


def load_cases() -> dict[str, Case]:
    """Import every module under boltz_cp/parity/cases so that they register."""
    import importlib
    import pkgutil

    import boltz_cp.parity.cases as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return CASES


@dataclass
class CaseResult:
    name: str
    n: int
    mesh: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    passed: bool
    detail: str = ""
    serial_abs_err: float | None = None  # float32: upstream's own float32 error, for scale
    skipped: str = ""  # why the case cannot run in this dtype (neither passed nor failed)

    def line(self) -> str:
        if self.skipped:
            return f"{self.name} tokens={self.n} mesh={self.mesh} dtype={self.dtype} SKIP ({self.skipped})"
        verdict = "PASS" if self.passed else "FAIL"
        extra = f" ({self.detail})" if self.detail and not self.passed else ""
        serial = "" if self.serial_abs_err is None else f" serial_max_abs_err={self.serial_abs_err:.3e}"
        return (
            f"{self.name} tokens={self.n} mesh={self.mesh} dtype={self.dtype} "
            f"max_abs_err={self.max_abs_err:.3e} max_rel_err={self.max_rel_err:.3e}{serial} {verdict}{extra}"
        )


def twin_from(upstream: nn.Module, cp_module: nn.Module) -> nn.Module:
    """Load upstream's state dict into the CP module, strictly, in upstream's dtype."""
    cp_module.load_state_dict(upstream.state_dict(), strict=True)
    dtype = next(upstream.parameters()).dtype
    return cp_module.to(dtype).eval()


def _errors(out: dict, ref: dict) -> tuple[float, float]:
    abs_err, rel_err = 0.0, 0.0
    for k, r in ref.items():
        d = (out[k].double() - r.double()).abs()
        abs_err = max(abs_err, float(d.max()) if d.numel() else 0.0)
        denom = r.double().abs().clamp_min(1e-12)
        rel_err = max(rel_err, float((d / denom).max()) if d.numel() else 0.0)
    return abs_err, rel_err


def _flat_err(out: dict, ref: dict) -> torch.Tensor:
    return torch.cat([(out[k].double() - r.double()).abs().flatten() for k, r in ref.items()])


def inputs_on_cuda(inputs: dict) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs.values())


def run_case(name: str, mesh: CPMesh, n: int, dtype: str = "float64", preset: str = "tiny", seed: int = 0) -> CaseResult:
    """Build, run and judge one case on `mesh` (call on every rank; returns the same verdict)."""
    cases = load_cases()
    if name not in cases:
        raise KeyError(f"unknown parity module '{name}'; known: {', '.join(sorted(cases))}")
    case, pre = cases[name], LAYER_WIDTHS[preset]
    fixed = getattr(case, "checkpoint_preset", None)
    if fixed is not None and preset != "tiny":
        raise ConfigError(f"parity case {name} builds the `{fixed}` checkpoint preset's model; "
                          f"--preset {preset} (layer widths) does not apply to it")
    if dtype == "bf16-mixed" and getattr(case, "bf16_mixed_unsupported", None):
        return CaseResult(name, n, f"{mesh.rows}x{mesh.cols}", dtype, float("nan"), float("nan"), False,
                          skipped=case.bf16_mixed_unsupported)
    gen = torch.Generator().manual_seed(seed)
    upstream64 = randomize_(case.build(pre), gen).double().eval()
    inputs64 = case.inputs(n, pre, gen)
    if hasattr(case, "num_tokens"):  # a case on a real input fixes N itself
        n = case.num_tokens(inputs64)
    layout = TokenLayout(n, mesh)
    with torch.inference_mode():
        with fp64_reference():
            ref = case.serial(upstream64, inputs64)
        mesh_name = f"{mesh.rows}x{mesh.cols}"
        if dtype == "float64":
            out = case.cp(case.cp_twin(upstream64), inputs64, layout)
            abs_err, rel_err = _errors(out, ref)
            try:
                for k, r in ref.items():
                    torch.testing.assert_close(out[k], r, msg=lambda m, k=k: f"{k}: {m.splitlines()[0]}")
                return CaseResult(name, n, mesh_name, dtype, abs_err, rel_err, True)
            except AssertionError as e:
                return CaseResult(name, n, mesh_name, dtype, abs_err, rel_err, False, str(e).splitlines()[0])
        upstream32 = copy.deepcopy(upstream64).float()
        inputs32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs64.items()}
        # bf16-mixed: fp32 weights under autocast, as upstream's Lightning precision does it.
        mixed = torch.autocast("cuda" if inputs_on_cuda(inputs32) else "cpu", dtype=torch.bfloat16,
                               enabled=dtype == "bf16-mixed")
        with mixed:
            serial32 = case.serial(upstream32, inputs32)
        with mixed:
            out32 = case.cp(case.cp_twin(upstream32), inputs32, layout)
    abs_err, rel_err = _errors(out32, ref)
    e_cp, e_serial = _flat_err(out32, ref), _flat_err(serial32, ref)
    qs = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    q_cp, q_serial = torch.quantile(e_cp, qs), torch.quantile(e_serial, qs)
    ok = bool((q_cp <= 1.25 * q_serial + 1e-30).all()) and float(e_cp.max()) <= 2 * float(e_serial.max()) + 1e-30
    detail = (
        f"cp p50/p90/p99/max={q_cp.tolist()}/{float(e_cp.max()):.3e} "
        f"serial={q_serial.tolist()}/{float(e_serial.max()):.3e}"
    )
    return CaseResult(name, n, mesh_name, dtype, abs_err, rel_err, ok, detail, float(e_serial.max()))
