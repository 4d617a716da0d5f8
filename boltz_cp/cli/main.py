"""`boltz_cp` command line: `boltz_cp predict INPUT [key=value ...]`.

Runs as a plain process (1x1 mesh) or under torchrun, where every rank runs this same entry
point. A problem the user can fix (`BoltzCPError`) is printed as one line naming it, on every
rank that sees it, and the process exits with status 2; anything else is a bug and keeps its
traceback (status 1).
"""

from __future__ import annotations

import os
import sys

from boltz_cp.errors import BoltzCPError, ConfigError

USAGE = """\
usage: boltz_cp predict INPUT [key=value ...] [--cfg job] [--help]
       torchrun --nproc-per-node K -m boltz_cp predict INPUT mesh=RxC [key=value ...]

INPUT is a Boltz-2 .yaml/.fasta file or a directory of them. Settings are Hydra overrides
(`key=value`, `mesh=2x2`, `mesh.rows=2`); `--cfg job` prints the composed configuration.
Results go to <out_dir>/boltz_results_<INPUT stem>/ in Boltz-2's layout.
"""


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command != "predict":
            raise ConfigError(f"unknown command '{command}' (available: predict)")
        return _predict(rest)
    except BoltzCPError as e:
        print(f"boltz_cp: error: {_rank_prefix()}{e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"boltz_cp: {_rank_prefix()}interrupted", file=sys.stderr, flush=True)
        return 130


def _predict(args: list[str]) -> int:
    from boltz_cp.cli.config import compose_config, config_help

    want_help = any(a in ("-h", "--help") for a in args)
    show_cfg = "--cfg" in args
    if show_cfg:
        i = args.index("--cfg")
        if args[i + 1 : i + 2] != ["job"]:
            raise ConfigError("only `--cfg job` is supported")
        del args[i : i + 2]
    args = [a for a in args if a not in ("-h", "--help")]
    positional = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    cfg = compose_config(overrides)
    if want_help or show_cfg:
        if want_help:
            print(USAGE)
            print("Settings (defaults shown):\n")
        print(config_help(cfg))
        return 0
    if len(positional) != 1:
        raise ConfigError(f"expected exactly one INPUT path, got {positional or 'none'}\n{USAGE}")
    from boltz_cp.cli.predict import predict

    predict(cfg, positional[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
