"""Strict input checks (boltz_cp/data/validate.py) and what a run says. Tier: no process group
(the checks, the residue-library line, upstream's stdout), end-to-end CLI (1x1 subprocess, 2x2
and 1x2 torchrun on CPU, each with a deadline).

Nothing wrong passes silently: an unknown key, a residue outside its alphabet and an MSA whose
query row is not its chain each stop the input with one line naming it, before any model work.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from data_fixtures import SMALL_A3M
from test_cli import _assert_ranks_stop_with, _predict_args, _run, _torchrun

from boltz_cp.data.inputs import required_ccd_codes
from boltz_cp.errors import InputError

QUERY = "MKTAYIAKQRQ"  # the query row of SMALL_A3M
OTHER = "MKTAYIAKQRA"  # one residue off, at position 11

# file name: (text, fragments its one line must hold); "{a3m}" is the MSA file's name
BAD = {
    "top_key.yaml": ("version: 1\nsequence:\n  - protein: {id: A, sequence: MK, msa: empty}\n",
                     ["unknown key 'sequence'", "the top level", "did you mean 'sequences'"]),
    "entity_key.yaml": ("version: 1\nsequences:\n  - protein: {id: A, sequense: MK, msa: empty}\n",
                        ["unknown key 'sequense'", "sequences[0].protein (id A)", "did you mean 'sequence'"]),
    "constraint_key.yaml": (("version: 1\nsequences:\n  - protein: {id: A, sequence: MK, msa: empty}\n"
                             "  - ligand: {id: B, ccd: ATP}\n"
                             "constraints:\n  - pocket: {binder: B, contacs: [[A, 1]]}\n"),
                            ["unknown key 'contacs'", "constraints[0].pocket", "did you mean 'contacts'"]),
    "protein_digit.yaml": ("version: 1\nsequences:\n  - protein: {id: A, sequence: MKT4A, msa: empty}\n",
                           ["protein chain A", "residue 4 is '4'"]),
    "protein_lower.yaml": ("version: 1\nsequences:\n  - protein: {id: P, sequence: MKtA, msa: empty}\n",
                           ["protein chain P", "residue 3 is 't'"]),
    "dna_digit.yaml": ("version: 1\nsequences:\n  - dna: {id: D, sequence: AC1GT}\n", ["dna chain D", "residue 3 is '1'"]),
    "dna_letter.yaml": ("version: 1\nsequences:\n  - dna: {id: D, sequence: ACGU}\n", ["dna chain D", "residue 4 is 'U'"]),
    "dna_lower.yaml": ("version: 1\nsequences:\n  - dna: {id: D, sequence: ACGt}\n", ["dna chain D", "residue 4 is 't'"]),
    "rna_letter.yaml": ("version: 1\nsequences:\n  - rna: {id: R, sequence: ACGT}\n", ["rna chain R", "residue 4 is 'T'"]),
    "rna_digit.yaml": ("version: 1\nsequences:\n  - rna: {id: R, sequence: 7ACGU}\n", ["rna chain R", "residue 1 is '7'"]),
    "rna_lower.yaml": ("version: 1\nsequences:\n  - rna: {id: R, sequence: ACgU}\n", ["rna chain R", "residue 3 is 'g'"]),
    "msa_query.yaml": (f"version: 1\nsequences:\n  - protein: {{id: A, sequence: {OTHER}, msa: {{a3m}}}}\n",
                       ["protein chain A", "{a3m}", "position 11"]),
    "fasta_digit.fasta": (">A|protein|empty\nMK9\n", ["protein chain A", "residue 3 is '9'"]),
    "fasta_msa.fasta": (f">A|protein|{{a3m}}\n{OTHER}\n", ["protein chain A", "{a3m}", "position 11"]),
}


def _bad_inputs(folder: Path) -> Path:
    """A folder with every BAD input and the MSA they name."""
    folder.mkdir()
    (folder.parent / "query.a3m").write_text(SMALL_A3M)
    for name, (text, _) in BAD.items():
        (folder / name).write_text(text.replace("{a3m}", "../query.a3m"))
    return folder


def _fragments(name: str) -> list[str]:
    return [f.replace("{a3m}", "query.a3m") for f in BAD[name][1]]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_named(name, tmp_path):
    path = _bad_inputs(tmp_path / "in") / name
    with pytest.raises(InputError) as err:
        required_ccd_codes(path)
    message = str(err.value)
    assert "\n" not in message and name in message
    for fragment in _fragments(name):
        assert fragment in message, message


@pytest.mark.parametrize("text", [
    # upstream's own unknown residues (X, and B J O U Z, which its tokenizer also reads as UNK; N)
    ("  - protein: {id: A, sequence: MXBJOUZ, msa: empty}\n  - dna: {id: B, sequence: ACGTN}\n"
     "  - rna: {id: C, sequence: ACGUN}\n"),
    # a declared modification may sit on any letter
    "  - protein: {id: A, sequence: M1K, msa: empty, modifications: [{position: 2, ccd: SEP}]}\n",
    # the featurizer's rule: differences only where the chain has an unknown residue
    "  - protein: {id: A, sequence: MKTAXIAKQXQ, msa: ../query.a3m}\n",
], ids=["unknowns", "modified", "msa_unknowns"])
def test_accepted(text, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "query.a3m").write_text(SMALL_A3M)
    path = tmp_path / "in" / "case.yaml"
    path.write_text("version: 1\nsequences:\n" + text)
    required_ccd_codes(path)


@pytest.mark.parametrize("text, fragment", [
    ("  - protein: {id: A, sequence: MKT, msa: empty, modifications: [{position: 0, ccd: SEP}]}\n",
     "position 0 is not a residue of the chain (1..3)"),
    ("  - protein: {id: A, sequence: MKT, msa: empty, modifications: [{position: 1, cdd: SEP}]}\n",
     "unknown key 'cdd' in {path} at sequences[0].protein (id A).modifications[0] (did you mean 'ccd'?)"),
    ("  - protein: {id: A, sequence: MKTAYIAKQRQA, msa: ../query.a3m}\n",
     "position 12 (lengths: chain 12, MSA query 11)"),
    ("  - protein: {id: A, sequence: MKTAYIAKQRQ, msa: ../query.csv}\n",
     ("query.csv does not belong to protein chain A in {path}: its first (query) row differs from the chain's "
      "sequence at position 3 (chain 'T', MSA 'S')")),
    ("  - ligand: {id: L, ccd: ATP}\nproperties:\n  - afinity: {binder: L}\n",
     "unknown key 'afinity' in {path} at properties[0] (did you mean 'affinity'?)"),
    ("  - protein: {id: A, sequence: MKT, msa: empty}\ntemplates:\n  - cif: a.cif\n    chain: A\n",
     "unknown key 'chain' in {path} at templates[0]"),
], ids=["mod_position", "mod_key", "msa_length", "csv_query", "property_key", "template_key"])
def test_rejected(text, fragment, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "query.a3m").write_text(SMALL_A3M)
    (tmp_path / "query.csv").write_text("key,sequence\n-1,MKSAYIAKQRQ\n1,MKTAYIAKQRQ\n")
    path = tmp_path / "in" / "case.yaml"
    path.write_text("version: 1\nsequences:\n" + text)
    with pytest.raises(InputError) as err:
        required_ccd_codes(path)
    assert fragment.format(path=path) in str(err.value), str(err.value)


# Small equivalents of upstream Boltz's example inputs (examples/ of its repository), valid.
GOOD = {
    "prot.yaml": f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {QUERY}\n"
                 "      msa: ../query.a3m\n",
    "ligand.yaml": "version: 1\nsequences:\n  - protein:\n      id: [A, B]\n      sequence: MVTPEGNVSLV\n"
                   "      msa: empty\n  - ligand:\n      id: C\n      ccd: ATP\n"
                   "  - ligand:\n      id: E\n      smiles: 'N[C@@H](Cc1ccc(O)cc1)C(=O)O'\n",
    "cyclic_prot.yaml": "version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: QLEDSEVEAVAKG\n"
                        "      msa: empty\n      cyclic: true\n",
    "pocket.yaml": "version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: MXKTAYIAKQR\n"
                   "      msa: empty\n      modifications:\n        - position: 1\n          ccd: MSE\n"
                   "  - ligand:\n      id: B\n      smiles: 'CC(=O)O'\nconstraints:\n  - pocket:\n"
                   "      binder: B\n      contacts: [[A, 3], [A, 5]]\n      max_distance: 6.0\n"
                   "  - contact:\n      token1: [A, 2]\n      token2: [A, 9]\n      max_distance: 8.0\n",
    "ligand_fasta.fasta": ">A|protein|empty\nMVTPEGNVSLVDESLLVG\n"
                    ">B|ccd\nATP\n",
}
N_EMPTY_MSA = 4  # inputs whose parse prints upstream's "Found explicit empty MSA"


def test_upstream_examples_pass_the_checks(tmp_path):
    (tmp_path / "query.a3m").write_text(SMALL_A3M)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, text in GOOD.items():
        (folder / name).write_text(text)
        required_ccd_codes(folder / name)


def test_residue_library_line(tmp_path, boltz_cache):
    """A build says what it builds; nothing is said when the cache is complete."""
    from boltz_cp.data.ccd import ensure_molecules

    mols = tmp_path / "mols"
    shutil.copytree(boltz_cache / "mols", mols)
    (mols / "GLY.pkl").unlink()
    lines: list[str] = []
    assert ensure_molecules(mols, ["ATP"], log=lines.append) == ["GLY"]
    assert len(lines) == 1 and "1 canonical residues (first run" in lines[0] and str(mols) in lines[0]
    assert ensure_molecules(mols, ["ATP"], log=lines.append) == [] and len(lines) == 1


def test_upstream_stdout_once_and_prefixed(capsys):
    """Upstream prints with click.echo and print; the writer shows each line once, with our prefix."""
    import click

    from boltz_cp.cli.progress import Progress

    log = Progress(True)
    for show in (True, False):
        with log.upstream_stdout(show):
            click.echo("Found explicit empty MSA for some proteins,", nl=False)
            print(end=" ")
            print("will run these in single sequence mode.")
            print("trailing without newline", end="")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[boltz_cp ") and lines[0].endswith(
        "] Found explicit empty MSA for some proteins, will run these in single sequence mode.")
    assert lines[1].endswith("] trailing without newline")


def _assert_each_named(stderr: str, out: Path, good: tuple[str, ...] = ()) -> None:
    """Every bad input has its own line with its fragments; nothing of theirs was written."""
    assert f"{len(BAD)} of {len(BAD) + len(good)} inputs failed" in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    for name in BAD:
        mine = [line for line in lines if line.strip().startswith(f"{name}: ")]
        assert mine, (name, stderr[-3000:])
        assert all(f in mine[0] for f in _fragments(name)), mine[0]
    results = out / "boltz_results_in"
    for sub in ("predictions", "processed/records"):
        written = sorted(p.stem for p in (results / sub).iterdir()) if (results / sub).exists() else []
        assert written == sorted(Path(g).stem for g in good), (sub, written)
    assert not list(out.rglob(".staging-*"))


def test_bad_inputs_cli_1x1(tmp_path, boltz_cache, tiny_ckpt):
    """The bad inputs next to a valid one (prot_no_msa.yaml), on a cache missing one canonical
    residue: the bad ones fail alone, the good one folds; the run says it builds the residue and
    writes the precision and device it used."""
    folder = _bad_inputs(tmp_path / "in")
    (folder / "prot_no_msa.yaml").write_text("version: 1\nsequences:\n  - protein: {id: A, sequence: MKTAYIA, msa: empty}\n")
    cache = tmp_path / "cache"
    shutil.copytree(boltz_cache / "mols", cache / "mols")
    (cache / "mols" / "GLY.pkl").unlink()
    out = tmp_path / "out"
    r = _run([sys.executable, "-m", "boltz_cp", *_predict_args(folder, out, cache, tiny_ckpt)], timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_each_named(r.stderr, out, good=("prot_no_msa.yaml",))
    assert "Traceback" not in r.stderr
    built = [line for line in r.stderr.splitlines() if "building residue library" in line]
    assert len(built) == 1 and "1 canonical residues (first run" in built[0] and built[0].startswith("[boltz_cp")
    config = (out / "boltz_results_in" / "boltz_cp_config.yaml").read_text()
    assert "precision: fp32" in config and "device: cpu" in config, config


def test_bad_inputs_cli_2x2(tmp_path, boltz_cache, tiny_ckpt):
    folder = _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    r = _torchrun(4, _predict_args(folder, out, boltz_cache, tiny_ckpt, "mesh=2x2"), timeout=180)
    _assert_ranks_stop_with(r, f"{len(BAD)} of {len(BAD)} inputs failed", 4)  # no traceback of ours
    _assert_each_named(r.stderr, out)
    assert "loading checkpoint" not in r.stderr


def test_upstream_examples_fold_on_1x2(tmp_path, boltz_cache, tiny_ckpt):
    """The valid examples fold (CP, 1x2 mesh); upstream's "Found explicit empty MSA" comes once per
    input (from the writer, prefixed); the written config names the precision and device used."""
    (tmp_path / "query.a3m").write_text(SMALL_A3M)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, text in GOOD.items():
        (folder / name).write_text(text)
    cache = tmp_path / "cache"  # pocket.yaml's MSE is built here, not in the shared cache
    shutil.copytree(boltz_cache / "mols", cache / "mols")
    out = tmp_path / "out"
    r = _torchrun(2, _predict_args(folder, out, cache, tiny_ckpt, "mesh=1x2", "model.backend=cp"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = out / "boltz_results_in" / "predictions"
    assert sorted(p.name for p in preds.iterdir()) == sorted(Path(n).stem for n in GOOD)
    for name in GOOD:
        assert (preds / Path(name).stem / f"{Path(name).stem}_model_0.cif").exists()
    lines = r.stderr.splitlines()
    empty = [line for line in lines if "Found explicit empty MSA" in line]
    assert len(empty) == N_EMPTY_MSA and all(line.startswith("[boltz_cp") for line in empty), empty
    assert "Found explicit empty MSA" not in r.stdout
    config = (out / "boltz_results_in" / "boltz_cp_config.yaml").read_text()
    assert "precision: fp32" in config and "device: cpu" in config and "auto" not in config
