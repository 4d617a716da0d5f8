#!/usr/bin/env python
"""The prepared GPU check: one command on a machine with one CUDA GPU, one markdown report.

    python scripts/gpu_check.py [--dry-run] [--out benchmarks/results/gpu_check_<date>.md]
                                [--work DIR] [--budget-s 450] [--sizes 512 1024 2048]

Steps (each a subprocess with its own timeout, cut to what is left of --budget-s; a failed or
timed-out step is recorded and the rest still run):
  env     torch / CUDA / GPU, cuEquivariance present?, the efficient op's schema.
  (a)     every attention backend (torch = materialised, fused = kernels/cuda.efficient_block,
          cueq = kernels/cuda.cueq_block, auto) against a float64 materialised reference on
          CUDA, fp32 and bf16, shapes [rows, H=4, Q, K, D=32] including kv_len = 1 mod 32 and a
          query row whose keys are all masked (-1e9; and -inf for the raw op, recorded); then
          900 x 900 x 900 (one rank's block at N=3,605 on 2x2): ms per call, peak extra memory.
  (b)     `boltz_cp predict` on 1x1, model.backend=cp vs reference, fp32, tiny random checkpoint
          (scripts/make_random_checkpoint.py), examples/multichain.yaml: outputs compared.
  (c)     the same cp run on a 2x2 mesh as 4 ranks sharing the GPU over gloo
          (torchrun --nproc-per-node 4, dist_backend=gloo): equal to 1x1? per-rank device memory.
  (d)     1x1 cp (kernels.attention torch / fused / cueq) vs upstream Boltz-2
          (model.backend=reference) at N = --sizes, bf16-mixed, 0 recycles, 2 steps, a
          full-width random checkpoint with few blocks: wall time and peak device memory.
`--dry-run` (CPU is fine) prints every step's command, timeout and shapes, checks that the
scripts and inputs exist and that every predict command's settings compose and validate, and
exits 0 if they all do. The report names the GPU, the date and this command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MIB = 2**20
FEW_BLOCKS = "pairformer=2,msa=1,template=1,confidence=1,token_transformer=2,atom_encoder=1,atom_decoder=1"
H, D = 4, 32
KERNEL_SHAPES = ((64, 256, 256), (64, 256, 225), (8, 100, 33))  # (rows, Q, K); 225, 33 = 1 mod 32
BIG = 900


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


def _predict_argv(inp, out, *settings) -> list[str]:
    return ["predict", str(inp), f"out_dir={out}", *settings]


def build_plan(work: Path, sizes: list[int], device: str = "cuda") -> list[dict]:
    """The steps, in order: {name, section, argv, timeout, notes, runs?, world}."""
    example = REPO / "examples" / "multichain.yaml"
    tiny, few = work / "tiny.ckpt", work / "full_few_blocks.ckpt"
    cache = f"cache={work / 'cache'}"
    me = [PY, str(Path(__file__).resolve())]
    common_b = (f"device={device}", "precision=fp32", "recycling_steps=1", "sampling_steps=20",
                "diffusion_samples=1", "seed=0", f"checkpoint={tiny}", cache)
    b_runs = [
        {"name": "reference 1x1", "argv": _predict_argv(example, work / "b_ref", *common_b, "model.backend=reference")},
        {"name": "cp 1x1", "argv": _predict_argv(example, work / "b_cp", *common_b, "model.backend=cp")},
    ]
    c_runs = [{"name": "cp 2x2 (4 ranks, gloo, one GPU)",
               "argv": _predict_argv(example, work / "c_cp", *common_b, "model.backend=cp", "mesh=2x2",
                                     "dist_backend=gloo")}]
    common_d = (f"device={device}", "precision=bf16-mixed", "recycling_steps=0", "sampling_steps=2",
                "diffusion_samples=1", "seed=0", f"checkpoint={few}", cache, "write_full_pae=false",
                "write_full_pde=false")
    d_runs = [  # untimed warm-ups first: CUDA context, cuBLAS handles, residue library
        {"name": "warm-up reference", "warmup": True,
         "argv": _predict_argv(example, work / "d_warm_ref", *common_d, "model.backend=reference")},
        {"name": "warm-up cp", "warmup": True,
         "argv": _predict_argv(example, work / "d_warm_cp", *common_d, "model.backend=cp")},
    ]
    variants = [("cp " + k, f"kernels.attention={k}") for k in ("torch", "fused", "cueq")]
    for n in sizes:
        inp = work / "inputs" / f"synthetic_{n}.yaml"
        d_runs.append({"name": "reference", "n": n,
                       "argv": _predict_argv(inp, work / f"d_{n}_ref", *common_d, "model.backend=reference")})
        for name, setting in variants:
            d_runs.append({"name": name, "n": n, "kernel": setting.split("=")[1],
                           "argv": _predict_argv(inp, work / f"d_{n}_{name.replace(' ', '_')}", *common_d,
                                                 "model.backend=cp", setting)})
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    steps = [
        {"name": "env", "section": "env", "argv": me + ["--step", "env", "--json", str(work / "env.json")],
         "timeout": 60, "notes": "torch, CUDA, GPU, cuEquivariance, efficient-op schema"},
        {"name": "kernels", "section": "a", "argv": me + ["--step", "kernels", "--json", str(work / "kernels.json")],
         "timeout": 150, "notes": f"[rows, H={H}, Q, K, D={D}] in {KERNEL_SHAPES}, fp32 and bf16, vs fp64; "
                                  f"{BIG}^3 timing and peak memory"},
        {"name": "tiny checkpoint", "section": "b",
         "argv": [PY, str(REPO / "scripts" / "make_random_checkpoint.py"), str(tiny), "--preset", "tiny"],
         "timeout": 90, "notes": "random tiny weights"},
        {"name": "predict 1x1 cp vs reference", "section": "b", "runs": b_runs, "world": 1,
         "argv": me + ["--measure", str(work / "b.json"), "--runs", str(work / "b_runs.json")],
         "timeout": 240, "notes": "examples/multichain.yaml, fp32, 1 recycle, 20 steps"},
        {"name": "predict 2x2 on one GPU over gloo", "section": "c", "runs": c_runs, "world": 4,
         "argv": torchrun + [str(Path(__file__).resolve()), "--measure", str(work / "c.json"),
                             "--runs", str(work / "c_runs.json")],
         "timeout": 240, "notes": "4 ranks share cuda:0; P2P staged through host memory"},
        {"name": "full-width few-block checkpoint", "section": "d",
         "argv": [PY, str(REPO / "scripts" / "make_random_checkpoint.py"), str(few), "--preset", "full",
                  "--blocks", FEW_BLOCKS], "timeout": 120, "notes": f"Boltz-2 widths, blocks {FEW_BLOCKS}"},
        {"name": "cp vs upstream Boltz-2", "section": "d", "runs": d_runs, "world": 1,
         "argv": me + ["--measure", str(work / "d.json"), "--runs", str(work / "d_runs.json")],
         "timeout": 420, "notes": f"N = {sizes} (synthetic 4-chain proteins), bf16-mixed, 0 recycles, 2 steps; "
                                  "variants in one process after untimed warm-ups"},
    ]
    return steps


def validate_plan(steps: list[dict]) -> list[str]:
    """What would make the real run fail before it starts: missing files, settings that do not
    compose or validate. -> problems (empty: all good)."""
    from boltz_cp.cli.config import compose_config
    from boltz_cp.cli.predict import validate
    from boltz_cp.distributed.runtime import BACKENDS
    from boltz_cp.errors import BoltzCPError, ConfigError

    problems = []
    for path in ("scripts/make_random_checkpoint.py", "examples/multichain.yaml"):
        if not (REPO / path).exists():
            problems.append(f"missing {path}")
    try:
        import torch.distributed.run  # noqa: F401  (torchrun)
    except ImportError as e:
        problems.append(f"torchrun unavailable: {e}")
    for step in steps:
        for run in step.get("runs", []):
            argv = run["argv"]
            settings = [a for a in argv[2:] if "=" in a]
            old = os.environ.get("WORLD_SIZE")
            os.environ["WORLD_SIZE"] = str(step["world"])
            try:
                cfg = compose_config(settings)
                validate(cfg)
                if cfg.dist_backend not in BACKENDS:  # checked by init_distributed otherwise
                    raise ConfigError(f"dist_backend={cfg.dist_backend} is not one of {', '.join(BACKENDS)}")
            except BoltzCPError as e:
                problems.append(f"{step['name']} / {run['name']}: {e}")
            finally:
                if old is None:
                    os.environ.pop("WORLD_SIZE", None)
                else:
                    os.environ["WORLD_SIZE"] = old
    try:
        from boltz_cp.data.synthetic import synthetic_proteins_yaml

        synthetic_proteins_yaml(16)
    except Exception as e:  # noqa: BLE001
        problems.append(f"synthetic inputs: {type(e).__name__}: {e}")
    return problems


def print_plan(steps: list[dict], budget: float) -> None:
    print(f"GPU check plan (budget {budget:.0f} s; each step's timeout is cut to what is left):")
    for i, step in enumerate(steps):
        print(f"\n[{i}] ({step['section']}) {step['name']}  timeout {step['timeout']} s  -- {step['notes']}")
        print("    $ " + shlex.join(step["argv"]))
        for run in step.get("runs", []):
            tag = " (warm-up, untimed)" if run.get("warmup") else ""
            n = f" N={run['n']}" if "n" in run else ""
            print(f"      run{n} {run['name']}{tag}: boltz_cp " + shlex.join(run["argv"]))


# ----------------------------------------------------------------------------------------------
# Child steps (run in subprocesses of the real check)
# ----------------------------------------------------------------------------------------------


def step_env(out: Path) -> None:
    import torch

    from boltz_cp.kernels import cuda as kc

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
    info["cueq"] = kc.cueq_available()
    if info["cueq"]:
        import importlib.metadata as md

        info["cueq_version"] = {p: md.version(p) for p in ("cuequivariance-torch", "cuequivariance-ops-torch-cu12")
                                if _has_dist(p)}
    try:
        kc._efficient_op()
        info["efficient_schema"] = "matches"
    except Exception as e:  # noqa: BLE001
        info["efficient_schema"] = str(e)
    out.write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def _has_dist(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def step_kernels(out: Path, dev: str = "cuda") -> None:
    import torch

    from boltz_cp.kernels import cuda as kc
    from boltz_cp.kernels.attention import attend_block

    torch.backends.cuda.matmul.allow_tf32 = False  # as upstream predict ("highest")
    torch.backends.cudnn.allow_tf32 = False
    sc = D ** -0.5
    fns = {
        "torch": lambda q, k, v, b: attend_block(q, k, v, b, scale=sc, shared_bias=True, backend="torch"),
        "auto": lambda q, k, v, b: attend_block(q, k, v, b, scale=sc, shared_bias=True, backend="auto"),
        "fused": lambda q, k, v, b: kc.efficient_block(q, k, v, b, scale=sc),
        "cueq": lambda q, k, v, b: kc.cueq_block(q, k, v, b, scale=sc),
    }
    res = {"accuracy": [], "timing": []}

    def save():
        out.write_text(json.dumps(res, indent=1))

    for dt in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dt == torch.float32 else 5e-2
        for rows, nq, nk in KERNEL_SHAPES:
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(rows, H, n, D, device=dev, generator=g).to(dt) for n in (nq, nk, nk))
            bias = torch.randn(1, H, nq, nk, device=dev, generator=g)
            bias[:, :, 3, :] = -1e9  # query row 3: every key masked
            s = (q.double() @ k.double().transpose(-1, -2)) * sc + bias.double()
            o_ref, l_ref = torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)
            live = torch.ones(nq, dtype=torch.bool, device=dev)
            live[3] = False
            for name, fn in fns.items():
                row = {"dtype": str(dt).replace("torch.", ""), "shape": [rows, nq, nk], "backend": name}
                try:
                    o, lse = fn(q, k, v, bias)
                    torch.cuda.synchronize()
                    # A fully masked row only needs a finite out and a finite lse near -1e9 (its
                    # weight in the merge ~0): its out depends on how -1e9 + q.k rounds.
                    row.update(out_err=float((o.double() - o_ref)[:, :, live].abs().max()),
                               lse_err=float((lse.double() - l_ref)[:, :, live].abs().max()),
                               masked_out_finite=bool(o[:, :, 3].isfinite().all()),
                               masked_lse=float(lse[:, :, 3].double().max()), lse_dtype=str(lse.dtype))
                    row["ok"] = (row["out_err"] <= tol and row["lse_err"] <= tol and row["masked_out_finite"]
                                 and -2e9 < row["masked_lse"] < -1e8)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                res["accuracy"].append(row)
                save()
            if (rows, nq, nk) == KERNEL_SHAPES[0]:  # the raw op with a -inf row (not our contract)
                row = {"dtype": str(dt).replace("torch.", ""), "shape": [rows, nq, nk], "backend": "fused, -inf row"}
                try:
                    b_inf = bias.clone()
                    b_inf[:, :, 3, :] = float("-inf")
                    o, lse = kc.efficient_block(q, k, v, b_inf, scale=sc)
                    torch.cuda.synchronize()
                    row.update(masked_lse=float(lse[:, :, 3].double().max()),
                               masked_out_nan=bool(o[:, :, 3].isnan().any()),
                               out_err=float((o.double() - o_ref)[:, :, live].abs().max()))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                res["accuracy"].append(row)
                save()
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(BIG, H, BIG, D, device=dev, generator=g).to(dt) for _ in range(3))
        bias = torch.randn(1, H, BIG, BIG, device=dev, generator=g)
        for name, fn in fns.items():
            row = {"dtype": str(dt).replace("torch.", ""), "backend": name}
            try:
                fn(q, k, v, bias)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                for _ in range(5):
                    o, lse = fn(q, k, v, bias)
                    del o, lse
                torch.cuda.synchronize()
                row.update(ms=200 * (time.perf_counter() - t0),
                           peak_extra_mib=(torch.cuda.max_memory_allocated() - base) / MIB)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            res["timing"].append(row)
            save()
            torch.cuda.empty_cache()
        del q, k, v, bias
    save()


def measure(out: Path, runs_file: Path) -> int:
    """Run `boltz_cp <argv>` in this process for each run; per rank: wall s, peak device MiB."""
    import torch

    from boltz_cp.cli.main import main

    runs = json.loads(runs_file.read_text())
    rank = int(os.environ.get("RANK", "0"))
    path = out.with_suffix(f".rank{rank}.json")
    results = []
    for run in runs:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            rc = main(list(run["argv"]))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # noqa: BLE001
            rc, run["error"] = 1, f"{type(e).__name__}: {e}"
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None
        results.append({**{k: v for k, v in run.items() if k != "argv"}, "rc": rc, "wall_s": wall,
                        "cuda_peak_mib": peak})
        path.write_text(json.dumps(results, indent=1))  # after every run: a timeout keeps the rest
    return 0


# ----------------------------------------------------------------------------------------------
# Comparing written predictions
# ----------------------------------------------------------------------------------------------


def read_prediction(out_dir: Path, stem: str) -> dict:
    import gemmi
    import numpy as np

    pred = out_dir / f"boltz_results_{stem}" / "predictions" / stem
    st = gemmi.read_structure(str(pred / f"{stem}_model_0.cif"))
    xyz = np.array([a.pos.tolist() for ch in st[0] for res in ch for a in res])
    conf = json.loads((pred / f"confidence_{stem}_model_0.json").read_text())
    arrays = {}
    for f in ("plddt", "pae", "pde"):
        p = pred / f"{f}_{stem}_model_0.npz"
        if p.exists():
            a = np.load(p)
            arrays[f] = a[a.files[0]]
    return {"xyz": xyz, "conf": conf, "arrays": arrays}


def compare(got: dict, want: dict) -> dict:
    """RMSD (A), max |confidence scalar| and max |pLDDT/PAE/PDE| differences; `ok` at the CPU
    tests' bar (RMSD <= 1e-3 A, confidences within 1e-4)."""
    import numpy as np

    rmsd = float(np.sqrt(((got["xyz"] - want["xyz"]) ** 2).sum(-1).mean()))
    conf = max([abs(got["conf"][k] - v) for k, v in want["conf"].items() if isinstance(v, float)] or [0.0])
    arrays = max([float(np.abs(got["arrays"][f] - a).max()) for f, a in want["arrays"].items()] or [0.0])
    return {"rmsd": rmsd, "conf": conf, "arrays": arrays, "ok": rmsd <= 1e-3 and conf <= 1e-4 and arrays <= 1e-4}


# ----------------------------------------------------------------------------------------------
# The real run and its report
# ----------------------------------------------------------------------------------------------


def run_steps(steps: list[dict], work: Path, budget: float) -> list[dict]:
    start = time.monotonic()
    log = []
    for step in steps:
        left = budget - (time.monotonic() - start)
        entry = {"name": step["name"], "section": step["section"]}
        if left < 20:
            entry.update(status="skipped (time budget spent)", wall_s=0.0)
            log.append(entry)
            continue
        if "runs" in step:
            runs = step["runs"]
            if (_load(work / "env.json") or {}).get("cueq") is False:
                # kernels.attention=cueq would fall back to fused: not a run of its own
                runs = [r for r in runs if r.get("kernel") != "cueq"]
            Path(step["argv"][step["argv"].index("--runs") + 1]).write_text(json.dumps(runs))
        timeout = min(step["timeout"], left - 5)
        t0 = time.monotonic()
        print(f"[gpu_check] {step['name']} (timeout {timeout:.0f} s)", file=sys.stderr, flush=True)
        try:
            r = subprocess.run(step["argv"], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
            status = "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
            tail = (r.stdout[-1500:] + "\n" + r.stderr[-2500:]).strip()
        except subprocess.TimeoutExpired as e:
            status = f"TIMEOUT after {timeout:.0f} s"
            tail = ((e.stdout or b"")[-1500:].decode(errors="replace") + "\n"
                    + (e.stderr or b"")[-2500:].decode(errors="replace")).strip()
        entry.update(status=status, wall_s=time.monotonic() - t0, tail=tail)
        log.append(entry)
    return log


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(x, spec=".2e"):
    return "-" if x is None else format(x, spec)


def write_report(out: Path, work: Path, log: list[dict], sizes: list[int], command: str, wall: float) -> None:
    env = _load(work / "env.json") or {}
    lines = [f"# GPU check, {_dt.date.today().isoformat()}", "",
             f"Command: `{command}` ({wall:.0f} s). GPU: {env.get('gpu', '?')} (cc {env.get('capability', '?')}, "
             f"{env.get('memory_gib', '?')} GiB), torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"cuEquivariance: {env.get('cueq_version') or 'not installed'}; efficient-op schema: "
             f"{env.get('efficient_schema', '?')}.", ""]
    ran = {e["section"] for e in log}
    k = _load(work / "kernels.json") or {}
    if "a" in ran:
        lines += _section_a(k)
    if "b" in ran or "c" in ran:
        lines += _section_bc(work, ran)
    if "d" in ran:
        lines += _section_d(work)
    lines += ["", "## Steps", "", "| step | status | wall s |", "|---|---|---|"]
    for e in log:
        lines.append(f"| ({e['section']}) {e['name']} | {e['status']} | {e['wall_s']:.1f} |")
    for e in log:
        if e["status"] != "ok" and e.get("tail"):
            lines += ["", f"### {e['name']}: {e['status']}", "", "```", e["tail"][-3000:], "```"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def _rows_of(work: Path, name: str) -> list[dict]:
    """Every rank's measured runs of a --measure step."""
    res = []
    for p in sorted(work.glob(f"{name}.rank*.json")):
        res += [dict(r, rank=int(p.suffixes[-2][5:])) for r in (_load(p) or [])]
    return res


def _section_a(k: dict) -> list[str]:
    lines = ["## (a) attention block vs float64 (CUDA)", "",
              "Max |error| over live query rows; query row 3 has every key at -1e9 (its lse must be finite "
              "and about -1e9, its out finite). fp32 bar 1e-4, bf16 5e-2.", "",
              "| dtype | rows, Q, K | backend | out err | lse err | masked row out finite | masked row lse | ok |",
              "|---|---|---|---|---|---|---|---|"]
    for r in k.get("accuracy", []):
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['shape']} | {r['backend']} | {r['error']} | | | | no |")
        elif r["backend"].endswith("-inf row"):
            lines.append(f"| {r['dtype']} | {r['shape']} | {r['backend']} | {_fmt(r.get('out_err'))} | | "
                         f"out NaN: {r.get('masked_out_nan')} | {r.get('masked_lse')} | (info) |")
        else:
            lines.append(f"| {r['dtype']} | {r['shape']} | {r['backend']} | {_fmt(r['out_err'])} | "
                         f"{_fmt(r['lse_err'])} | {r['masked_out_finite']} | {r['masked_lse']:.4g} | "
                         f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", f"Block {BIG} rows x {H} heads x {BIG} queries x {BIG} keys, D {D} (5 calls after one warm-up):", "",
              "| dtype | backend | ms per call | peak extra MiB |", "|---|---|---|---|"]
    for r in k.get("timing", []):
        lines.append(f"| {r['dtype']} | {r['backend']} | " + (r["error"] + " | |" if "error" in r else
                     f"{r['ms']:.1f} | {r['peak_extra_mib']:.0f} |"))
    return lines + [""]


def _section_bc(work: Path, ran: set) -> list[str]:
    lines = ["## (b) `boltz_cp predict` 1x1: cp vs reference (fp32, tiny random weights)", "",
             "(The first run also builds the residue library and warms CUDA up.)", ""]
    for r in _rows_of(work, "b"):
        lines.append(f"- {r['name']}: exit {r['rc']}, {r['wall_s']:.1f} s, peak device {_fmt(r['cuda_peak_mib'], '.0f')} MiB"
                     + (f" ({r['error']})" if r.get("error") else ""))
    lines.append(f"- cp vs reference: {_compare_dirs(work / 'b_cp', work / 'b_ref')}")
    if "c" in ran:
        lines += ["", "## (c) 2x2 as 4 ranks on one GPU (gloo)", ""]
        for r in _rows_of(work, "c"):
            lines.append(f"- rank {r['rank']}: exit {r['rc']}, {r['wall_s']:.1f} s, peak device "
                         f"{_fmt(r['cuda_peak_mib'], '.0f')} MiB" + (f" ({r['error']})" if r.get("error") else ""))
        lines.append(f"- 2x2 vs 1x1 cp: {_compare_dirs(work / 'c_cp', work / 'b_cp')}")
        lines.append(f"- 2x2 vs reference: {_compare_dirs(work / 'c_cp', work / 'b_ref')}")
    return lines + [""]


def _section_d(work: Path) -> list[str]:
    lines = ["## (d) 1x1 cp vs upstream Boltz-2 (bf16-mixed, 0 recycles, 2 steps, full widths, "
             f"blocks {FEW_BLOCKS})", "",
              "Wall time of the whole `boltz_cp predict` call (featurize, load, forward, write; the same "
              "work on both sides), after untimed warm-ups in the same process.", ""]
    if (_load(work / "env.json") or {}).get("cueq") is False:
        lines += ["cuEquivariance is not installed: no `cp cueq` runs (`pip install -e '.[cueq]'`).", ""]
    lines += ["| N | run | exit | wall s | vs reference | peak device MiB |", "|---|---|---|---|---|---|"]
    d = [r for r in _rows_of(work, "d") if not r.get("warmup")]
    ref = {r["n"]: r for r in d if r["name"] == "reference" and r["rc"] == 0}
    for r in d:
        ratio = f"{r['wall_s'] / ref[r['n']]['wall_s']:.2f}x" if r["n"] in ref and r["rc"] == 0 else "-"
        lines.append(f"| {r['n']} | {r['name']} | {r['rc']} | {r['wall_s']:.1f} | {ratio} | "
                     f"{_fmt(r['cuda_peak_mib'], '.0f')} |")
    return lines + [""]


def _compare_dirs(got: Path, want: Path) -> str:
    try:
        c = compare(read_prediction(got, "multichain"), read_prediction(want, "multichain"))
    except Exception as e:  # noqa: BLE001 -- a missing output is a result too
        return f"not compared ({type(e).__name__}: {str(e)[:120]})"
    return (f"RMSD {c['rmsd']:.2e} A, max confidence diff {c['conf']:.2e}, max pLDDT/PAE/PDE diff "
            f"{c['arrays']:.2e}: {'equal at the CPU tests bar' if c['ok'] else 'NOT equal at the CPU tests bar'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check it; run nothing")
    ap.add_argument("--out", type=Path, default=None, help="report (default benchmarks/results/gpu_check_<date>.md)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="total time for all steps (default 450)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="N of step (d)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run: env,a,b,c,d (default all)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke-test the machinery
    ap.add_argument("--step", choices=["env", "kernels"], help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        {"env": step_env, "kernels": step_kernels}[args.step](args.json)
        return 0
    if args.measure:
        return measure(args.measure, args.runs)

    command = "python scripts/gpu_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    work = args.work or Path(tempfile.mkdtemp(prefix="boltz_cp_gpu_check_"))
    steps = build_plan(work.resolve(), args.sizes, args.device)
    if args.only:
        keep = set(args.only.split(","))
        steps = [s for s in steps if s["section"] in keep]
    if args.dry_run:
        print_plan(steps, args.budget_s)
        problems = validate_plan(steps)
        for p in problems:
            print(f"PROBLEM: {p}")
        print(f"\ndry run: {len(steps)} steps, "
              f"{sum(len(s.get('runs', [])) for s in steps)} predict runs, {len(problems)} problem(s)")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        return 1 if problems else 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs").mkdir(exist_ok=True)
    from boltz_cp.data.synthetic import synthetic_proteins_yaml

    for n in args.sizes:
        (work / "inputs" / f"synthetic_{n}.yaml").write_text(synthetic_proteins_yaml(n, 4, seed=n))
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_check_{_dt.date.today().isoformat()}.md"
    t0 = time.monotonic()
    log = run_steps(steps, work, args.budget_s)
    write_report(out, work, log, args.sizes, command, time.monotonic() - t0)
    print(f"report: {out} (scratch: {work})")
    return 0 if all(e["status"] == "ok" for e in log) else 1


if __name__ == "__main__":
    sys.exit(main())
