"""`boltz_cp` command line: `boltz_cp predict INPUT [key=value ...]`.

Runs as a plain process (1x1 mesh) or under torchrun, where every rank runs this same entry
point. A problem the user can fix (`BoltzCPError`) is printed as one line naming it, on every
rank that sees it, and the process exits with status 2; anything else is a bug and keeps its
traceback (status 1). When another rank dies or the launcher stops this one (torchrun sends
SIGTERM to the other ranks once one fails), the rank says so in one line, naming the failed rank
and its input when that rank left a record (cli/faults.py), and exits 2 after its clean-up ran
(no staging folder is left behind).
"""

from __future__ import annotations

import os
import signal
import sys

from boltz_cp.errors import BoltzCPError, ConfigError, RankFailure

USAGE = """\
usage: boltz_cp predict INPUT [key=value ...] [--cfg job] [--help]
       boltz_cp plan INPUT [gpus=G] [gpu_memory_gb=M] [nodes=K] [key=value ...]
       torchrun --nproc-per-node K -m boltz_cp predict INPUT mesh=RxC|auto [dp=D] [key=value ...]

INPUT is a Boltz-2 .yaml/.fasta file or a directory of them. Settings are Hydra overrides
(`key=value`, `mesh=2x2`, `mesh.rows=2`, `mesh=auto`); `--cfg job` prints the composed
configuration. `dp=D` splits the launched processes into D meshes that share the inputs.
Results go to <out_dir>/boltz_results_<INPUT stem>/ in Boltz-2's layout. `plan` prints the
predicted per-rank memory, time and traffic of the same run on every mesh G GPUs allow (no weights).
"""


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""


def _stopped(signum, _frame) -> None:
    from boltz_cp.cli.faults import failed_rank

    # One stop is enough: a second SIGTERM must not interrupt the clean-up this one starts.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    name = signal.Signals(signum).name
    record = failed_rank(wait_s=1.0)  # the launcher stops us after the failed rank exited: written by then
    if record:
        raise RankFailure(f"stopped by {name} (the launcher stops every rank once one fails): {record}")
    raise RankFailure(f"stopped by {name}: the launcher stops every rank once one fails "
                      "or the job is cancelled; the failing rank's message or the launcher's summary names it")


def peer_failure(e: BaseException) -> RankFailure | None:
    """The one-line error for a communication failure (a peer died, hung or closed its connection),
    naming the failed rank and its input when that rank left a record; None for any other exception."""
    from boltz_cp.cli.faults import failed_rank, is_communication_error

    if not is_communication_error(e):
        return None
    record = failed_rank()
    if record:
        return RankFailure(f"lost contact with another rank: {record}")
    reason = str(e).splitlines()[0].split("] ", 1)[-1].split(". This is typically", 1)[0][:200]
    return RankFailure(f"lost contact with another rank ({reason}): a rank failed, stopped or hung; its own "
                       "message or the launcher's summary names it")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _stopped)
    try:
        return _main(argv)
    finally:
        # Past this point a SIGTERM just ends the exiting process (no error raised in atexit).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command not in ("predict", "plan"):
            raise ConfigError(f"unknown command '{command}' (available: predict, plan)")
        return _predict(rest, command)
    except BoltzCPError as e:
        return _report(f"error: {_rank_prefix()}{e}", 2)
    except KeyboardInterrupt:
        return _report(f"{_rank_prefix()}interrupted", 130)
    except RuntimeError as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as in _report: reading the record may take seconds
        failure = peer_failure(e)
        if failure is None:
            raise
        return _report(f"error: {_rank_prefix()}{failure}", 2)


def _report(message: str, status: int) -> int:
    # The launcher's SIGTERM often lands while a rank reports its own failure: ignore it from
    # here on, so the one line is not replaced by a second error's traceback.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"boltz_cp: {message}", file=sys.stderr, flush=True)
    return status


def _predict(args: list[str], command: str = "predict") -> int:
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
    cfg = compose_config(overrides, name=command)
    if want_help or show_cfg:
        if want_help:
            print(USAGE)
            print("Settings (defaults shown):\n")
        print(config_help(cfg))
        return 0
    if len(positional) != 1:
        raise ConfigError(f"expected exactly one INPUT path, got {positional or 'none'}\n{USAGE}")
    if command == "plan":
        from boltz_cp.cli.plan import plan

        return plan(cfg, positional[0])
    from boltz_cp.cli.predict import predict

    predict(cfg, positional[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
