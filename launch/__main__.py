"""`python -m launch env|hostfile|hostnames|run-dir ...` (see docs/LAUNCH.md).

Exit codes: 0 done; 1 the launch environment or the arguments are unusable (the message says why
and what to do); 2 an invalid training configuration (run-dir).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.env import LaunchError, resolve
from launch.hostfile import hostfile_lines
from launch.hostlist import HostlistError, expand
from pretrain.errors import ExitCode


def _env(args: argparse.Namespace) -> int:
    info = resolve(use_mpi4py=not args.no_mpi)
    if args.json:  # one write per line: the ranks of one launcher share a stdout
        sys.stdout.write(json.dumps(info.as_dict()) + "\n")
        sys.stdout.flush()
    elif args.export:
        for key, value in info.torch_env().items():
            print(f"export {key}={value}")
    else:
        print(info.describe())
    return 0


def _hostfile(args: argparse.Namespace) -> int:
    text = "\n".join(hostfile_lines(nodelist=args.nodelist, slots=args.slots)) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: {len(text.splitlines())} nodes", file=sys.stderr)
    return 0


def _hostnames(args: argparse.Namespace) -> int:
    try:
        print("\n".join(expand(args.hostlist)))
    except HostlistError as e:
        raise LaunchError(str(e)) from None
    return 0


def _run_dir(args: argparse.Namespace) -> int:
    # pretrain.config is light (no torch); a broken config fails here, before any node is used.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pretrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    print(cfg.run.dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "env", help="this process's rank, world and rendezvous as resolved from its launcher"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--export", action="store_true", help="as shell export lines (RANK, WORLD_SIZE, ...)")
    p.add_argument("--no-mpi", action="store_true", help="do not ask mpi4py (under mpirun)")
    p.set_defaults(run=_env)
    p = commands.add_parser("hostfile", help="a DeepSpeed hostfile from the SLURM allocation (or --nodelist)")
    p.add_argument("--output", "-o", help="file to write (default: stdout)")
    p.add_argument("--slots", type=int, help="processes (GPUs) per node (default: from the allocation)")
    p.add_argument("--nodelist", help="a SLURM host list, e.g. 'gpu[01-04]' (default: $SLURM_JOB_NODELIST)")
    p.set_defaults(run=_hostfile)
    p = commands.add_parser("hostnames", help="expand a SLURM host list, one host a line (as scontrol does)")
    p.add_argument("hostlist")
    p.set_defaults(run=_hostnames)
    p = commands.add_parser("run-dir", help="the run.dir a config and overrides resolve to")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(run=_run_dir)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.REFUSED


if __name__ == "__main__":
    sys.exit(main())
