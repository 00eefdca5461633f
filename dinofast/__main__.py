"""`python -m dinofast` / `dinofast`: subcommands; with none, print the backends this machine has.

    dinofast extract --model PATH --images DIR_OR_GLOB --out DIR [...]   features for a dataset
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _report() -> int:
    import torch

    import dinofast
    from dinofast import _backend

    print(f"dinofast {dinofast.__version__}, torch {torch.__version__}")
    for device_type in ("cpu", "cuda"):
        for name in dinofast.BACKENDS:
            reason = _backend.why_unavailable(name, device_type)
            print(f"  {device_type:4s} {name:9s} {'ok' if reason is None else 'off: ' + reason}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dinofast import extract

    parser = argparse.ArgumentParser(prog="dinofast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    extract.add_arguments(sub.add_parser("extract", help="DINOv3 features for a folder of images (torchrun-ready)"))
    args = parser.parse_args(argv)
    if args.command is None:
        return _report()
    if args.command == "extract":
        extract.run(args)
        return 0
    parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
