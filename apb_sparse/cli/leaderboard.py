"""``apb leaderboard``: rewrite the leaderboard files and plots of a run from its results.jsonl."""
from __future__ import annotations

from pathlib import Path

from ..bench.leaderboard import to_markdown, write_leaderboard
from ..bench.results import read_records
from .checks import _check_output


def _cmd_leaderboard(args, parser) -> int:
    path = Path(args.results) if args.results else Path(args.out) / "results.jsonl"
    if not path.is_file():
        parser.error(f"argument {'--results' if args.results else '--out'}: no results file {str(path)!r}")
    _check_output("--results" if args.results else "--out", path.parent / "leaderboard.md")
    records = read_records(path)
    files = write_leaderboard(records, path.parent, plots=not args.no_plots)
    print(to_markdown(records))
    for kind, f in files.items():
        print(f"{kind + ':':<10} {f}")
    return 0
