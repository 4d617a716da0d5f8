"""Host memory and wall time of featurization: `featurize_lean` vs upstream's dense featurizer.

    python benchmarks/bench_featurize.py [--tokens 1000 5000 20000] [--chains 4] [--work DIR]
                                         [--upstream-limit-gb 16]

Inputs are synthetic multichain proteins (`msa: empty`, random sequences from a fixed seed,
tokens split evenly over the chains). Each input is parsed once in its own process; then each
measurement runs in a fresh process that imports everything, featurizes a 40-token input to
warm imports and numba, records its peak RSS so far (the baseline), featurizes the input once
and records wall time and peak RSS (getrusage ru_maxrss). `lean+shard2x2` also cuts, in the same
process, every rank's trunk inputs for a 2x2 mesh (token blocks, MSA column blocks, atom windows;
each rank builds its own pair tiles from the compact lists). Upstream is skipped where its dense
features alone would need more than --upstream-limit-gb (estimate printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from boltz_cp.data.synthetic import synthetic_proteins_yaml

REPO = Path(__file__).resolve().parent.parent
WARMUP_TOKENS = 40


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------- child processes


def _prepare(work: Path, n_tokens: int, chains: int) -> dict:
    """Parse and write one synthetic input; returns its sizes."""
    from boltz.data.module.inferencev2 import load_input
    from boltz.data.tokenize.boltz2 import Boltz2Tokenizer

    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.inputs import ProcessedDirs, parse_target, write_processed

    mol_dir = work / "mols"
    ensure_molecules(mol_dir)
    root = work / f"n{n_tokens}"
    path = root / f"syn{n_tokens}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(synthetic_proteins_yaml(n_tokens, chains))
    t0 = time.perf_counter()
    dirs = ProcessedDirs(root / "processed").make()
    record = write_processed(parse_target(path, mol_dir), path, dirs)
    parse_s = time.perf_counter() - t0
    data = load_input(record, dirs.structures, dirs.msa, dirs.constraints, dirs.templates, dirs.mols)
    tokens = Boltz2Tokenizer().tokenize(data).tokens
    atoms = int(tokens["atom_num"].sum())
    return {
        "tokens": len(tokens),
        "atoms": atoms,
        "atoms_padded": ((atoms - 1) // 32 + 1) * 32,
        "resolved_polymer_tokens": int(tokens["resolved_mask"].sum()),
        "parse_s": parse_s,
    }


class _HostMesh:
    """Rank (r, c) of a side x side mesh, as the host-side cutting code sees it (no process group)."""

    def __init__(self, side: int, rank: int) -> None:
        self.rows = self.cols = side
        self.size, self.rank = side * side, rank
        self.coord = (rank // side, rank % side)
        self.token_multiple = self.size


def shard_for_mesh(feats: dict, side: int) -> list:
    """Every rank's O(N) / O(M) / O(S*N/p) trunk inputs, cut on the featurizing host: token blocks,
    MSA column blocks, the atom windows of the input embedder. (Each rank builds its own pair
    tiles from the compact bond / constraint lists, which it receives whole: O(E + K).)"""
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.models.trunk import TOKEN_FEATURES
    from boltz_cp.modules.encodersv2 import token_blocks
    from boltz_cp.modules.input_embedder import embedder_inputs
    from boltz_cp.modules.trunkv2 import msa_column_blocks

    n = feats["token_pad_mask"].shape[1]
    pieces = []
    for rank in range(side * side):
        layout = TokenLayout(n, _HostMesh(side, rank))
        pieces.append((token_blocks({k: feats[k] for k in TOKEN_FEATURES}, layout),
                       msa_column_blocks(feats, layout), embedder_inputs(feats, layout)))
    return pieces


def _measure(work: Path, n_tokens: int, method: str) -> dict:
    from boltz.data.types import Record

    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, featurize

    shard = method == "lean+shard2x2"
    fn = {"lean": featurize_lean, "lean+shard2x2": featurize_lean, "upstream": featurize}[method]
    mol_dir = work / "mols"

    def load(n):
        dirs = ProcessedDirs(work / f"n{n}" / "processed")
        return Record.load(dirs.records / f"syn{n}.json"), dirs

    fn(*load(WARMUP_TOKENS), mol_dir, seed=0)
    record, dirs = load(n_tokens)
    baseline = _max_rss_bytes()
    t0 = time.perf_counter()
    feats = fn(record, dirs, mol_dir, seed=0)
    pieces = shard_for_mesh(feats, 2) if shard else []  # alive until the peak is read
    wall = time.perf_counter() - t0
    peak = _max_rss_bytes()
    del pieces
    nbytes = sum(v.numel() * v.element_size() for v in feats.values() if hasattr(v, "element_size"))
    return {"wall_s": wall, "peak_rss": peak, "baseline_rss": baseline, "feature_bytes": nbytes}


# ---------------------------------------------------------------------------- parent


def upstream_estimate_bytes(n: int, m: int, r: int) -> int:
    """Upstream's dense host tensors at their peak (N tokens, M padded atoms, R resolved).

    During the distogram: token pair features (56 N^2: bonds f32, types i64, contact one-hot
    i64 x5, threshold f32) + disto_target f32 x64 (256 N^2) + its int64 one-hot (512 N^2).
    At the end, collate stacks a copy of everything: 2 x (312 N^2 + 8 M (3N + R)).
    """
    return max(832 * n * n, 2 * (312 * n * n + 8 * m * (3 * n + r)))


def _child(args: list[str], timeout: float | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--upstream-limit-gb", type=float, default=16.0)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, work, n = args.child[0], Path(args.child[1]), int(args.child[2])
        out = _prepare(work, n, int(args.child[3])) if kind == "prepare" else _measure(work, n, kind)
        print(json.dumps(out))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_featurize_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# nproc {os.cpu_count()}, RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB,"
          f" python {sys.version.split()[0]}, work dir {work}", flush=True)
    _child(["--child", "prepare", str(work), str(WARMUP_TOKENS), "1"])
    header = " ".join(
        f"{h:>{w}}" for h, w in [("tokens", 7), ("atoms", 7), ("method", 13), ("wall s", 8), ("peak RSS GB", 12),
                                 ("baseline GB", 12), ("features GB", 12)]
    )
    rows = []
    for n in args.tokens:
        info = _child(["--child", "prepare", str(work), str(n), str(args.chains)])
        if "error" in info:
            rows.append(f"{n:>7} {'':>7} {'prepare':>9}  failed: {info['error']}")
            print(rows[-1], flush=True)
            continue
        print(f"# prepared {n} tokens ({info['atoms']} atoms) in {info['parse_s']:.1f} s", flush=True)
        estimate = upstream_estimate_bytes(info["tokens"], info["atoms_padded"], info["resolved_polymer_tokens"])
        for method in ("lean", "lean+shard2x2", "upstream"):
            lead = f"{info['tokens']:>7} {info['atoms_padded']:>7} {method:>13}"
            if method == "upstream" and estimate > args.upstream_limit_gb * 1e9:
                rows.append(f"{lead} skipped (would need ~{estimate / 1e9:.0f} GB)")
            else:
                r = _child(["--child", method, str(work), str(n)])
                if "error" in r:
                    rows.append(f"{lead} failed: {r['error']}")
                else:
                    extra = f"  (estimate {estimate / 1e9:.1f} GB dense)" if method == "upstream" else ""
                    rows.append(
                        f"{lead} {r['wall_s']:>8.1f} {_gb(r['peak_rss']):>12} {_gb(r['baseline_rss']):>12}"
                        f" {_gb(r['feature_bytes']):>12}{extra}"
                    )
            print(rows[-1], flush=True)
    print()
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
