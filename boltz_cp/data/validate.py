"""Strict checks of an input's content, before upstream's parser sees it.

Upstream's schema parser reads the keys it knows and ignores the rest, maps any character it
does not know to an unknown residue, and (in its featurizer) swaps an MSA whose query row does
not match its chain for a one-row dummy. Each of these would let a mistake fold silently; here
each stops the input with one line naming the key, the residue or the file.

The alphabets are upstream's own (`boltz.data.const`): a protein residue is any letter upstream
maps (`X`, `B`, `J`, `O`, `U`, `Z` are its unknown residue, kept), DNA is `ACGTN`, RNA `ACGUN`
(`N`: its unknown nucleotide). A position named in `modifications` may hold any letter.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boltz_cp.errors import InputError

# Every key of upstream's YAML schema (boltz/data/parse/schema.py, parse_boltz_schema), by level.
TOP_KEYS = ("version", "sequences", "constraints", "templates", "properties")
ENTITY_KEYS = {
    "protein": ("id", "sequence", "msa", "modifications", "cyclic"),
    "dna": ("id", "sequence", "modifications", "cyclic"),
    "rna": ("id", "sequence", "modifications", "cyclic"),
    "ligand": ("id", "smiles", "ccd"),
}
MODIFICATION_KEYS = ("position", "ccd")
CONSTRAINT_KEYS = {
    "bond": ("atom1", "atom2"),
    "pocket": ("binder", "contacts", "max_distance", "force"),
    "contact": ("token1", "token2", "max_distance", "force"),
}
TEMPLATE_KEYS = ("cif", "pdb", "chain_id", "template_id", "force", "threshold")
PROPERTY_KEYS = {"affinity": ("binder",)}


def _close(key: Any, known) -> str:
    match = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_keys(path: Path, where: str, mapping: Any, known) -> None:
    if not isinstance(mapping, dict):
        raise InputError(f"malformed input {path}: {where} must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in known:
            raise InputError(f"unknown key '{key}' in {path} at {where}{_close(key, known)}; "
                             f"expected one of {', '.join(known)}")


def _check_list(path: Path, where: str, value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"malformed input {path}: {where} must be a list, got {type(value).__name__}")
    return value


def _one_key(path: Path, where: str, item: Any, known: dict) -> tuple[str, Any]:
    """The single `kind: body` of a list item whose kind is one of `known`."""
    if not isinstance(item, dict) or len(item) != 1:
        raise InputError(f"malformed input {path}: {where} must have exactly one key, one of {', '.join(known)}")
    (kind, body), = item.items()
    if kind not in known:
        raise InputError(f"unknown key '{kind}' in {path} at {where}{_close(kind, known)}; "
                         f"expected one of {', '.join(known)}")
    return kind, body


def check_schema(data: dict, path: Path) -> None:
    """Every key at every level is one upstream reads; the first unknown one is named with where
    it is and, when one is close, the key probably meant. (Entity types are checked by the caller.)"""
    _check_keys(path, "the top level", data, TOP_KEYS)
    sequences = data.get("sequences")
    for i, item in enumerate(sequences if isinstance(sequences, list) else []):
        if not isinstance(item, dict) or len(item) != 1:
            continue  # the caller reports the shape
        (etype, body), = item.items()
        known = ENTITY_KEYS.get(etype)
        if known is None or not isinstance(body, dict):
            continue
        where = f"sequences[{i}].{etype} (id {body.get('id')})"
        _check_keys(path, where, body, known)
        for j, mod in enumerate(_check_list(path, f"{where}.modifications", body.get("modifications"))):
            _check_keys(path, f"{where}.modifications[{j}]", mod, MODIFICATION_KEYS)
    for i, item in enumerate(_check_list(path, "constraints", data.get("constraints"))):
        kind, body = _one_key(path, f"constraints[{i}]", item, CONSTRAINT_KEYS)
        _check_keys(path, f"constraints[{i}].{kind}", body, CONSTRAINT_KEYS[kind])
    for i, tpl in enumerate(_check_list(path, "templates", data.get("templates"))):
        _check_keys(path, f"templates[{i}]", tpl, TEMPLATE_KEYS)
    for i, item in enumerate(_check_list(path, "properties", data.get("properties"))):
        kind, body = _one_key(path, f"properties[{i}]", item, PROPERTY_KEYS)
        _check_keys(path, f"properties[{i}].{kind}", body, PROPERTY_KEYS[kind])


def alphabet(etype: str) -> frozenset[str]:
    """The residue letters upstream's parser maps for a polymer type (its gap '-' excluded)."""
    from boltz.data import const

    letters = {"protein": const.prot_letter_to_token, "dna": const.dna_letter_to_token,
               "rna": const.rna_letter_to_token}[etype]
    return frozenset(c for c in letters if c != "-")


def modified_positions(path: Path, chain: Any, seq: str, modifications: Any) -> dict[int, str]:
    """{1-based position: CCD code} of a chain's modifications, each checked to be in the chain."""
    out = {}
    for mod in modifications or []:
        pos, ccd = mod.get("position"), mod.get("ccd")
        if not isinstance(pos, int) or isinstance(pos, bool) or not 1 <= pos <= len(seq):
            raise InputError(f"modification of chain {chain} in {path}: position {pos!r} is not a residue "
                             f"of the chain (1..{len(seq)})")
        if not isinstance(ccd, str) or not ccd:
            raise InputError(f"modification of chain {chain} in {path} at position {pos} needs a 'ccd' code")
        out[pos] = ccd
    return out


def check_sequence(path: Path, etype: str, chain: Any, seq: str, modified: dict[int, str] | None = None) -> None:
    """Every residue of a polymer is in upstream's alphabet for its type, or a declared modification."""
    allowed = alphabet(etype)
    for pos, c in enumerate(seq, start=1):
        if c not in allowed and pos not in (modified or {}):
            unknown = "X" if etype == "protein" else "N"
            hint = (f"write it as {c.upper()!r}" if c.upper() in allowed and c != c.upper()
                    else f"an unknown residue is written {unknown!r}, a modified one declared under 'modifications'")
            raise InputError(f"{etype} chain {chain} in {path}: residue {pos} is {c!r}, not in the {etype} "
                             f"alphabet ({''.join(sorted(allowed))}); {hint}")


def _chain_tokens(seq: str, modified: dict[int, str]) -> list[str]:
    """The residue names upstream's parser gives a protein chain (parse_polymer: MSE is read as
    MET, any other non-canonical code is UNK)."""
    from boltz.data import const

    names = []
    for pos, c in enumerate(seq, start=1):
        name = modified.get(pos)
        if name is None:
            name = const.prot_letter_to_token.get(c, "UNK")
        elif name == "MSE":
            name = "MET"
        elif name not in const.tokens:
            name = "UNK"
        names.append(name)
    return names


def _query_row(msa: Path) -> str | None:
    """The first (query) row of an .a3m or .csv MSA, read as upstream's parsers read it; None
    when the file has none (upstream's parser then reports it)."""
    if msa.suffix == ".csv":
        with msa.open(newline="") as f:
            for row in csv.DictReader(f):
                line = (row.get("sequence") or "").strip()
                if line:
                    return line
        return None
    with msa.open() as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ">")):
                return line
    return None


def check_msa_query(path: Path, chains: list, seq: str, modified: dict[int, str], msa: Path) -> None:
    """The MSA's query row is the chain's sequence, by upstream's featurizer's rule: equal residue
    names, except where the chain has an unknown residue, or where the chain has MET and the MSA
    an unknown (every difference of one of these kinds). Otherwise upstream swaps in a dummy MSA."""
    if msa.suffix not in (".a3m", ".csv") or not msa.is_file():
        return  # the reader reports a missing or unreadable file
    from boltz.data import const

    try:
        row = _query_row(msa)
    except (OSError, UnicodeDecodeError, csv.Error):
        return
    if row is None:
        return
    # a3m/csv rows: lowercase letters are insertions, '-' a gap (upstream's parse_a3m / parse_csv)
    query = [c for c in row if not (c != "-" and c.islower())]
    mine = _chain_tokens(seq, modified)
    theirs = [const.prot_letter_to_token.get(c, c) for c in query]
    diffs = [k for k in range(min(len(mine), len(theirs))) if mine[k] != theirs[k]]
    if len(mine) == len(theirs):
        if not diffs:
            return
        unk = all(mine[k] == "UNK" for k in diffs)
        met = all(mine[k] == "MET" and theirs[k] == "UNK" for k in diffs)
        if unk or met:
            return
    names = "/".join(map(str, chains))
    if diffs:
        k = diffs[0]
        where = f"at position {k + 1} (chain {seq[k]!r}, MSA {query[k]!r})"
    else:
        where = f"at position {min(len(mine), len(theirs)) + 1} (lengths: chain {len(mine)}, MSA query {len(theirs)})"
    raise InputError(f"MSA {msa} does not belong to protein chain {names} in {path}: its first (query) row "
                     f"differs from the chain's sequence {where}")


def check_entities(data: dict, path: Path, resolve: Callable[[str, Path], Path]) -> None:
    """Alphabets, modifications and MSA query rows of a YAML input's polymers (`resolve` turns an
    MSA path named in the input into a file path)."""
    for item in data["sequences"]:
        (etype, body), = item.items()
        if etype not in ("protein", "dna", "rna"):
            continue
        seq, chain = body["sequence"], body["id"]
        modified = modified_positions(path, chain, seq, body.get("modifications"))
        check_sequence(path, etype, chain, seq, modified)
        msa = body.get("msa")
        if etype == "protein" and isinstance(msa, str) and msa not in ("", "empty"):
            check_msa_query(path, chain if isinstance(chain, list) else [chain], seq, modified, resolve(msa, path))


def check_fasta_record(path: Path, chain: str, etype: str, seq: str, msa: str | None,
                       resolve: Callable[[str, Path], Path]) -> None:
    """One FASTA record's residues and MSA query row (FASTA has no modifications)."""
    if etype not in ("protein", "dna", "rna"):
        return
    check_sequence(path, etype, chain, seq)
    if etype == "protein" and msa and msa != "empty":
        check_msa_query(path, [chain], seq, {}, resolve(msa, path))
