"""The ``apb`` command (console script ``apb = apb_sparse.cli:main``; also ``python -m apb_sparse.cli``).

:func:`main` parses the command line, dispatches to the subcommand and reports failures as one
line.  Each job lives in its own module: :mod:`.parser` (the argument parser and its help texts;
``apb --help`` lists the subcommands), :mod:`.argtypes` (option value parsers), :mod:`.checks`
(inputs checked before any work), and one module per subcommand: :mod:`.run`, :mod:`.prune`,
:mod:`.evaluate` (``apb eval``), :mod:`.latency` (``apb bench latency``), :mod:`.leaderboard` and
:mod:`.taxonomy`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..bench.checkpoint import CheckpointError
# The helpers stay importable from here as before the split (hence the noqa); _dispatch looks the
# _cmd_* functions up here, so that they can be replaced (tests do).
from .argtypes import (STRUCTURE_CHOICES, _bounded, _eps, _json_dict, _nonneg_float, _nonneg_int,  # noqa: F401
                       _positive_float, _positive_int, _sparsity, _structure)
from .checks import (_available_memory_bytes, _check_arch, _check_finite_weights, _check_methods,  # noqa: F401
                     _check_model_size, _check_names, _check_out_folder, _check_output, _CliError, _dedupe, _download,
                     _fail, _load_apb_checkpoint)
from .evaluate import _cmd_eval
from .latency import _cmd_bench_latency
from .leaderboard import _cmd_leaderboard
from .parser import RUN_EPILOG, _Formatter, _preset_help, build_parser  # noqa: F401
from .prune import _cmd_prune
from .run import _check_executor, _cmd_run, _make_executor, _print_summary, _run_grid  # noqa: F401
from .taxonomy import _cmd_taxonomy

__all__ = ["main", "build_parser"]


# Import names of the "bench" extra's packages (pyproject.toml).
_BENCH_MODULES = {"torchvision", "sklearn", "scipy", "tqdm", "safetensors", "matplotlib", "pyautoattack", "secml",
                  "secmlt"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``apb`` console script.

    Argument errors exit with code 2 (argparse's usage message).  Any other failure is reported
    as one ``apb: error: ...`` line on stderr, without a traceback: exit code 2 for bad input
    (unreadable or corrupted files, paths that cannot be written), 1 for anything else.  Set
    ``APB_DEBUG=1`` in the environment to get the traceback of the latter instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(parser, args)
    except _CliError as e:
        return _report(str(e), e.code)
    except (CheckpointError, OSError) as e:  # a file we were given or told to write
        return _report(str(e), 2)
    except KeyboardInterrupt:
        print("\napb: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        return _missing_module(e)
    except Exception as e:
        if os.environ.get("APB_DEBUG"):
            raise
        return _report(f"{type(e).__name__}: {e} (set APB_DEBUG=1 for the traceback)", 1)


def _missing_module(e: ModuleNotFoundError) -> int:
    if e.name and e.name.split(".")[0] in _BENCH_MODULES:  # the core install has torch + numpy only
        return _report(f"the apb command needs the 'bench' extra (module {e.name!r} is missing): "
                       "pip install 'apb_sparse[bench]'", 1)
    if os.environ.get("APB_DEBUG"):
        raise e
    return _report(f"{type(e).__name__}: {e} (set APB_DEBUG=1 for the traceback)", 1)


def _report(message: str, code: int) -> int:
    print(f"apb: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _dispatch(parser: argparse.ArgumentParser, args) -> int:
    sub = {a.dest: a for a in parser._actions if isinstance(a, argparse._SubParsersAction)}["command"]
    sp = sub.choices[args.command]
    if args.command == "run":
        return _cmd_run(args, sp)
    if args.command == "prune":
        return _cmd_prune(args, sp)
    if args.command == "eval":
        return _cmd_eval(args, sp)
    if args.command == "bench":
        if args.bench_command != "latency":
            sp.print_help()
            return 2
        bsub = {a.dest: a for a in sp._actions if isinstance(a, argparse._SubParsersAction)}["bench_command"]
        return _cmd_bench_latency(args, bsub.choices["latency"])
    if args.command == "leaderboard":
        return _cmd_leaderboard(args, sp)
    if args.command == "taxonomy":
        return _cmd_taxonomy(args, sp)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2
