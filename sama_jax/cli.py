"""The command-line convention of every sama command.

    --config=configs/FILE.py[:ARG]   the config file and the argument of its get_config (config.py)
    --config.a.b=VALUE               overrides a config field (typed; unknown keys are named)
    --cpu-devices=N                  N simulated CPU devices (also --cpu_devices), set before jax starts
    --other-flags                    the command's own flags, argparse, dashed names

Errors the user can act on (a bad config key, a missing file, a refused overwrite...) print as one
line, `PROG: error: MESSAGE`, and exit with status 2; SAMA_TRACEBACK=1 shows the traceback instead.
Ctrl-C where a command has no clean stop of its own (sama_jax.interrupts) is one line, status 130.
A command started by child_processes.popen dies with the process that started it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from sama_jax import child_processes
from sama_jax import config as config_lib

# What a command reports in one line instead of a traceback: our own errors are ValueError
# subclasses (ConfigError, ShardingError, ParamsCheckpointError, MediaError, ...).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, config: bool = True):
    """-> (config or None, args). Handles --cpu-devices first (before jax is imported), then
    --config and its overrides, then the command's own flags with `parser` (so --help works
    without a config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.add_argument(
        "--cpu-devices",
        "--cpu_devices",
        type=int,
        default=0,
        metavar="N",
        help="simulate N CPU devices (a mesh on a laptop); must come before jax starts",
    )
    if config:
        parser.add_argument(
            "--config",
            metavar="FILE.py[:ARG]",
            help="config file and its get_config argument; override fields with --config.a.b=value",
        )
    spec, overrides, rest = config_lib.split_config_args(argv)
    args = parser.parse_args(rest + ([f"--config={spec}"] if config and spec else []))
    if args.cpu_devices:
        config_lib.simulate_cpu_devices([f"--cpu_devices={args.cpu_devices}"])
    if not config:
        if spec or overrides:
            parser.error("this command takes no --config")
        return None, args
    if not spec:
        parser.error("--config=configs/FILE.py[:ARG] is required")
    return config_lib.build_config(spec, overrides), args


def run(prog: str, main: Callable[[], int]) -> int:
    """Runs a command's body; a user error becomes one line on stderr and exit status 2."""
    child_processes.arm_from_environment()
    try:
        return main()
    except KeyboardInterrupt:
        if os.environ.get("SAMA_TRACEBACK"):
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 128 + 2  # the shell's status for SIGINT
    except USER_ERRORS as e:
        if os.environ.get("SAMA_TRACEBACK"):
            raise
        message = str(e).strip() or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
