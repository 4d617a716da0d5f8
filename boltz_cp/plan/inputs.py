"""The size of an input as the planner needs it, read with the prediction's own data path
(boltz_cp.data.inputs: parse, processed layout, upstream's tokenizer); no model, no weights."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

from boltz_cp.plan.planner import RunSize, msa_rows


def input_size(path: Path, mol_dir: Path, seed: int = 0, max_msa_seqs: int = 8192, subsample_msa: bool = True,
               num_subsampled_msa: int = 1024, msas=None, assume_server: bool = False) -> RunSize:
    """Tokens, atoms and MSA depth of one input (raises InputError as `predict` would).

    msas: predict's ServerMsas (cli/msa.py): the chains the server filled get its MSAs, as in
    the prediction. assume_server (the plan with use_msa_server=true, nothing fetched): protein
    chains without an MSA count as max_msa_seqs deep, and the size says so (`msa_assumed`)."""
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.inputs import (
        ProcessedDirs,
        parse_target,
        prepare_tokenized,
        required_ccd_codes,
        write_processed,
    )

    ensure_molecules(mol_dir, required_ccd_codes(path))
    # upstream's parser prints notes on stdout: keep stdout for the plan's table
    with contextlib.redirect_stdout(sys.stderr):
        target = parse_target(path, mol_dir, seed)
    assumed: list[str] = []
    if assume_server:
        from boltz_cp.data.msa_server import missing_msas

        for names in missing_msas(target).values():
            assumed += list(names)
        for chain in target.record.chains:  # sized below as max_msa_seqs deep
            if chain.chain_name in assumed:
                chain.msa_id = -1
    with tempfile.TemporaryDirectory(prefix="boltz_cp_plan_") as tmp:
        if msas is not None:
            msas.attach(path, target, Path(tmp) / "server_msa")
        dirs = ProcessedDirs(Path(tmp) / "processed").make()
        record = write_processed(target, path, dirs, max_msa_seqs)
        tokenized, *_ = prepare_tokenized(record, dirs, mol_dir)
    depth = max((len(m.sequences) for m in (tokenized.msa or {}).values()), default=1)
    if assumed:
        depth = max(depth, max_msa_seqs)
    return RunSize(name=path.name, tokens=len(tokenized.tokens), atoms=int(tokenized.tokens["atom_num"].sum()),
                   msa_depth=depth, msa_rows=msa_rows(depth, max_msa_seqs, subsample_msa, num_subsampled_msa),
                   msa_assumed=tuple(sorted(assumed)))
