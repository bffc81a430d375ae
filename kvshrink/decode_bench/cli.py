"""``python -m kvshrink.decode_bench ORIGINAL CONVERTED [...]``: the command of ``uptrain.decoding.bench``.

The options, the checks and the measuring are the library's (``python -m uptrain.evaluate --decode`` runs the
same bench); this module parses the command line, runs it and prints the report.
"""

from __future__ import annotations

import shlex
import sys

from kvshrink_base.errors import run_cli
from uptrain.decoding.bench import check_args, parse_args, run


def main(argv: list[str] | None = None, prog: str = "python -m kvshrink.decode_bench") -> int:
    """Run the command; returns its exit code (2: bad input, one line)."""
    args = parse_args(argv, prog)
    args.command = prog + " " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    def body() -> int:
        check_args(args)
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        report = run(args)
        print("\n".join(report))
        print(f"\nwrote results.csv, fit.csv, decode.png, report.txt to {args.out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
