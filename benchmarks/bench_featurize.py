"""Host memory and wall time of featurization: `featurize_lean` vs upstream's dense featurizer.

    python benchmarks/bench_featurize.py [--tokens 1000 5000 20000] [--chains 4] [--work DIR]
                                         [--upstream-limit-gb 16] [--msa-rows R] [--yaml FILE]
                                         [--subsample] [--json OUT]

Inputs are synthetic multichain proteins (`msa: empty`, random sequences from a fixed seed,
tokens split evenly over the chains). Each input is parsed once in its own process; then each
measurement runs in a fresh process that imports everything, featurizes a 40-token input to
warm imports and numba, records its peak RSS so far (the baseline), featurizes the input once
and records wall time and peak RSS (getrusage ru_maxrss). `lean+shard2x2` also cuts, in the same
process, every rank's trunk inputs for a 2x2 mesh (token blocks, MSA column blocks, atom windows;
each rank builds its own pair tiles from the compact lists). Upstream is skipped where its dense
features alone would need more than --upstream-limit-gb (estimate printed).

Deep MSAs: `--msa-rows R` writes an a3m of R rows per protein chain (the query, then
deterministic random variants: 30% substitutions, 10% gaps, lowercase insertions at 3% of
positions), so the MSA module sees R rows (no taxonomy: no pairing). `--yaml FILE` takes the
chains of FILE instead of synthetic ones (--tokens is then ignored). `lean+shard2x2` then also
materialises, per rank, what the MSA module takes: its rows of the kept rows (all, or with
`--subsample` upstream's randperm draw of num_subsampled_msa = 1,024) x its columns in
upstream's dtypes. `equal` featurizes with both paths and compares every MSA feature.
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


def _a3m(query: str, rows: int, seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    q = np.frombuffer(query.encode(), dtype="S1")
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype="S1")
    out = [f">query\n{query}\n"]
    for i in range(1, rows):
        r = rng.random(len(q))
        row = np.where(r < 0.3, letters[rng.integers(0, 20, len(q))], q)
        row = np.where(r > 0.9, b"-", row).astype("U1")
        ins = rng.random(len(q)) < 0.03
        row[ins] = np.char.add(row[ins], "ac")  # two inserted residues after these columns
        out.append(f">s{i}\n{''.join(row.tolist())}\n")
    return "".join(out)


def _input_yaml(root: Path, n_tokens: int, chains: int, msa_rows: int, source: str | None) -> str:
    import yaml

    text = Path(source).read_text() if source else synthetic_proteins_yaml(n_tokens, chains)
    if msa_rows <= 0:
        return text
    doc = yaml.safe_load(text)
    for i, entry in enumerate(doc["sequences"]):
        body = entry.get("protein")
        if body is not None:
            path = root / f"chain{i}.a3m"
            path.write_text(_a3m(body["sequence"], msa_rows, seed=i))
            body["msa"] = str(path)
    return yaml.safe_dump(doc)


def _prepare(work: Path, n_tokens: int, chains: int, msa_rows: int = 0, source: str | None = None) -> dict:
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
    dirs = ProcessedDirs(root / "processed").make()
    t0 = time.perf_counter()
    if (dirs.records / f"syn{n_tokens}.json").exists():  # prepared by an earlier run in this --work
        from boltz.data.types import Record

        record = Record.load(dirs.records / f"syn{n_tokens}.json")
    else:
        path.write_text(_input_yaml(root, n_tokens, chains, msa_rows, source))
        record = write_processed(parse_target(path, mol_dir), path, dirs, 8192)
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
        self.size, self.rank, self.local_rank = side * side, rank, rank
        self.coord = (rank // side, rank % side)
        self.token_multiple = self.size


def _msa_rows_taken(msa_cols: dict, layout, subsample: bool) -> dict:
    """What the MSA module materialises on this rank (trunkv2.MSAModule.forward's `take`)."""
    import torch

    from boltz_cp.distributed import padded_size, tile_bounds

    rows = msa_cols["msa"].shape[1]
    keep = torch.randperm(rows)[:1024] if subsample else torch.arange(rows)
    mine = tile_bounds(padded_size(len(keep), layout.mesh.token_multiple), layout.mesh.rows, layout.mesh.coord[0])
    idx = keep[mine.start:min(mine.stop, len(keep))]
    return {k: v.index_select(1, idx) for k, v in msa_cols.items()}


def shard_for_mesh(feats: dict, side: int, subsample: bool = False) -> list:
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
        msa_cols = msa_column_blocks(feats, layout)
        pieces.append((token_blocks({k: feats[k] for k in TOKEN_FEATURES}, layout), msa_cols,
                       _msa_rows_taken(msa_cols, layout, subsample), embedder_inputs(feats, layout)))
    return pieces


def _equal(work: Path, n_tokens: int) -> dict:
    """Both featurizers on the input: every MSA feature compared (dtype, shape, values)."""
    import torch
    from boltz.data.types import Record

    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, featurize
    from boltz_cp.data.msa_compact import MSA_DENSE_KEYS, msa_features_block

    dirs = ProcessedDirs(work / f"n{n_tokens}" / "processed")
    record = Record.load(dirs.records / f"syn{n_tokens}.json")
    up = featurize(record, dirs, work / "mols", seed=0)
    lean = featurize_lean(record, dirs, work / "mols", seed=0)
    whole = msa_features_block(lean, slice(0, up["msa"].shape[2]))
    whole.update(profile=lean["profile"], deletion_mean=lean["deletion_mean"])
    equal = {k: bool(up[k].dtype == whole[k].dtype and up[k].shape == whole[k].shape and torch.equal(up[k], whole[k]))
             for k in (*MSA_DENSE_KEYS, "profile", "deletion_mean")}
    return {"msa_shape": list(up["msa"].shape), "equal": equal, "all_equal": all(equal.values())}


def _measure(work: Path, n_tokens: int, method: str, subsample: bool = False) -> dict:
    import torch
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
    torch.manual_seed(0)
    pieces = shard_for_mesh(feats, 2, subsample) if shard else []  # alive until the peak is read
    wall = time.perf_counter() - t0
    peak = _max_rss_bytes()
    del pieces
    nbytes = sum(v.numel() * v.element_size() for v in feats.values() if hasattr(v, "element_size"))
    rows = feats["msa_residues" if "msa_residues" in feats else "msa"].shape[1]
    return {"msa_rows": rows,"wall_s": wall, "peak_rss": peak, "baseline_rss": baseline, "feature_bytes": nbytes}


# ---------------------------------------------------------------------------- parent


def upstream_estimate_bytes(n: int, m: int, r: int, s: int = 1) -> int:
    """Upstream's dense host tensors at their peak (N tokens, M padded atoms, R resolved).

    During the distogram: token pair features (56 N^2: bonds f32, types i64, contact one-hot
    i64 x5, threshold f32) + disto_target f32 x64 (256 N^2) + its int64 one-hot (512 N^2).
    At the end, collate stacks a copy of everything: 2 x (312 N^2 + 8 M (3N + R)).
    Plus the MSA (S rows): three int64 [N, S] arrays, their torch copies and the int64 one-hot
    of the profile: ~304 bytes per row and token.
    """
    return max(832 * n * n, 2 * (312 * n * n + 8 * m * (3 * n + r))) + 304 * s * n


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
    parser.add_argument("--msa-rows", type=int, default=0, help="a3m rows per protein chain (0: msa: empty)")
    parser.add_argument("--yaml", default=None, help="take the chains of this input instead of synthetic ones")
    parser.add_argument("--subsample", action="store_true", help="the MSA module's rows: subsample 1,024")
    parser.add_argument("--methods", nargs="+", default=["lean", "lean+shard2x2", "upstream"])
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, work, n = args.child[0], Path(args.child[1]), int(args.child[2])
        if kind == "prepare":
            out = _prepare(work, n, int(args.child[3]), int(args.child[4]), args.child[5] or None)
        elif kind == "equal":
            out = _equal(work, n)
        else:
            out = _measure(work, n, kind, args.child[3] == "1")
        print(json.dumps(out))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_featurize_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# nproc {os.cpu_count()}, RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB,"
          f" python {sys.version.split()[0]}, work dir {work}", flush=True)
    _child(["--child", "prepare", str(work), str(WARMUP_TOKENS), "1", "0", ""])
    results = []
    header = " ".join(
        f"{h:>{w}}" for h, w in [("tokens", 7), ("atoms", 7), ("method", 13), ("wall s", 8), ("peak RSS GB", 12),
                                 ("baseline GB", 12), ("features GB", 12)]
    )
    rows = []
    for n in args.tokens:
        info = _child(["--child", "prepare", str(work), str(n), str(args.chains), str(args.msa_rows), args.yaml or ""])
        if "error" in info:
            rows.append(f"{n:>7} {'':>7} {'prepare':>9}  failed: {info['error']}")
            print(rows[-1], flush=True)
            continue
        print(f"# prepared {n} tokens ({info['atoms']} atoms) in {info['parse_s']:.1f} s", flush=True)
        rows_msa = min(max(args.msa_rows, 1), 8192)
        estimate = upstream_estimate_bytes(info["tokens"], info["atoms_padded"], info["resolved_polymer_tokens"],
                                           rows_msa)
        for method in args.methods:
            lead = f"{info['tokens']:>7} {info['atoms_padded']:>7} {method:>13}"
            if method == "upstream" and estimate > args.upstream_limit_gb * 1e9:
                rows.append(f"{lead} skipped (would need ~{estimate / 1e9:.0f} GB)")
            else:
                r = _child(["--child", method, str(work), str(n), "1" if args.subsample else "0"])
                results.append({"method": method, "msa_rows_per_chain": args.msa_rows, "subsample": args.subsample,
                                "input": args.yaml or f"synthetic {args.chains} chains", **info, **r})
                if "error" in r:
                    rows.append(f"{lead} failed: {r['error']}")
                elif method == "equal":
                    rows.append(f"{lead} MSA {r['msa_shape']} all equal: {r['all_equal']} {r['equal']}")
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
