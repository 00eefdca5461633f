"""`python -m dinofast` (or `dinofast`): with no subcommand, prints the backends available here and,
for each op, a parity check and a speed table against the reference on random data.

Subcommands live in their own modules; each is listed once in SUBCOMMANDS as "module:function",
where function(argv) parses its own arguments.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "convert": "dinofast.models.checkpoint:main",  # original-layout DINOv3 checkpoint -> transformers dir
    "extract": "dinofast.extract:main",  # features for a dataset, torchrun-ready
    "bench": "dinofast.bench:cli",  # parity, timings and the test-suite on one device -> report.md/json
}


def _self_check(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinofast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    args = parser.parse_args(argv)
    import torch
    from dinofast import _checks

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(_checks.report(device))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module, fn = SUBCOMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), fn)(argv[1:]) or 0
    if argv and not argv[0].startswith("-"):
        print(f"dinofast: unknown subcommand {argv[0]!r}; expected one of {sorted(SUBCOMMANDS)} "
              "or none", file=sys.stderr)
        return 2
    return _self_check(argv)


if __name__ == "__main__":
    sys.exit(main())
