"""Errors that reach the user as one clear line.

Everything the CLI reports without a traceback derives from `BoltzCPError`; anything else is a
bug and is shown with its traceback.
"""


class BoltzCPError(Exception):
    """Base class: a problem the user can act on."""


class InputError(BoltzCPError):
    """A malformed or unsupported input file (FASTA, YAML, MSA, template, residue code)."""


class ConfigError(BoltzCPError):
    """A configuration that cannot run: mesh vs world size, unknown option, bad value."""


class CheckpointError(BoltzCPError):
    """A checkpoint that is missing, unreadable or not in upstream Boltz-2 format."""


class RankFailure(BoltzCPError):
    """This rank cannot go on because another rank of the job failed, stopped or hung, or the
    launcher stopped this one (SIGTERM): the failing rank's own message, or the launcher's
    summary, names it."""
