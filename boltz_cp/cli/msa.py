"""`use_msa_server=true` in `boltz_cp predict`: one rank of the job talks to the MSA server.

Global rank 0 (the writer of the first mesh) goes through the pending inputs before any model
loads, parses each one that has a protein chain without an MSA, and gets its MSAs from the cache
or the server (boltz_cp/data/msa_server.py). Each input's CSV files, or its one-line failure,
go to the job's c10d store (cli/faults.py), so every rank of the mesh that folds the input reads
them, on any node; the other ranks wait in the store (no collective, so a slow server cannot
trip the process-group timeout). A failed input fails alone, on its own mesh, like any other
input error.
"""

from __future__ import annotations

from pathlib import Path

from boltz_cp.cli import faults
from boltz_cp.errors import InputError


class ServerMsas:
    """The MSAs the server gave for this job's inputs, by input file name."""

    def __init__(self, cfg, cache: Path) -> None:
        from boltz_cp.data.msa_server import MsaServer

        self.server = MsaServer.from_config(cfg, cache) if cfg.use_msa_server else None
        self.ready: set[str] = set()
        self.local: dict[str, dict] = {}

    def fetch(self, files: list[Path], pending: list[int], mol_dir: Path, seed: int, rank: int, head,
              timeout_s: float) -> None:
        """Every rank, once, before any model loads: rank 0 fetches, the others wait for it."""
        from boltz_cp.data.msa_server import may_need_server

        if self.server is None:
            return
        asking = [i for i in pending if may_need_server(files[i])]
        done = None
        if rank == 0:
            # rank 0 keeps every answer: the memory check sizes every pending input (cli/plan.py)
            done = [files[i].name for i in asking if self._fetch_one(files[i], mol_dir, seed, head)]
        # Each input may take the client's deadline twice (paired, unpaired), plus parsing.
        deadline = len(asking) * (2 * self.server.timeout_s + 120) + timeout_s
        self.ready = set(faults.share_from_rank0(done, deadline, name="msa/done"))

    def _fetch_one(self, path: Path, mol_dir: Path, seed: int, head) -> bool:
        from boltz_cp.data.ccd import ensure_molecules
        from boltz_cp.data.inputs import parse_target, required_ccd_codes
        from boltz_cp.data.msa_server import FetchStats, fetch_msas

        faults.set_input(path.name)  # a crash here names the input to the other ranks
        try:
            try:
                ensure_molecules(mol_dir, required_ccd_codes(path))
                target = parse_target(path, mol_dir, seed)
            except InputError:
                return False  # the mesh that folds it reports the parse error
            stats = FetchStats()
            try:
                value = {"ok": fetch_msas(target, self.server, stats)}
                if value["ok"]:
                    head(f"{path.name}: MSAs from {self.server.shown_url}: {stats.requests} request(s), "
                         f"{stats.cached} answer(s) from the cache")
            except InputError as e:
                value = {"error": str(e)}
        finally:
            faults.set_input(None)
        faults.share_from_rank0(value, 60, name=f"msa/{path.name}")
        self.local[path.name] = value
        return True

    def attach(self, path: Path, target, folder: Path) -> None:
        """Point the parsed target's chains without an MSA at the server's (InputError: the
        server's failure for this input)."""
        from boltz_cp.data.msa_server import attach_msas

        if path.name not in self.ready:
            return
        value = self.local.get(path.name) or faults.share_from_rank0(None, 60, name=f"msa/{path.name}")
        if "error" in value:
            raise InputError(value["error"])
        attach_msas(target, value["ok"], folder)
