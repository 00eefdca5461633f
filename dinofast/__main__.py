"""`dinofast` / `python -m dinofast`: the command line.

Subcommands are listed once, in SUBCOMMANDS: name -> (module, one-line summary). A module either
has `add_arguments(parser)` and `main(args) -> int` (the parser is built here, prog "dinofast NAME"),
or only `main(argv) -> int`, which parses its own arguments. With no subcommand, `check` runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dinofast._cli import Parser, keep_freed_memory, positive_int  # light: no torch import

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check": ("dinofast.__main__",
              "every backend of every op against the reference: shapes, tolerance, PASS/FAIL (the default)"),
    "extract": ("dinofast.extract", "DINOv3 features for a folder or glob of images (resumable, torchrun-ready)"),
    "pca": ("dinofast.features", "pictures of extracted features: each image beside a PCA-to-RGB map of its patches"),
    "convert": ("dinofast.models.checkpoint", "write an original-layout DINOv3 checkpoint as a transformers directory"),
    "bench": ("dinofast.bench",
              "parity, timings against torch's peers and the test-suite on one device -> report.md/json"),
}


def _version() -> str:
    from dinofast import __version__

    return __version__


def _top_help() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: dinofast [--version] [--help] [SUBCOMMAND] [ARGS...]", "",
             "Fused kernels for DINOv3-style vision transformers; feature extraction and its readers.", "",
             "subcommands (dinofast SUBCOMMAND --help for each one's options):"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this message and exit",
              "  --version   print the dinofast version and exit", "",
              "`python -m dinofast` is the same command; with no subcommand it runs `check`."]
    return "\n".join(lines)


# ---- check ---------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available, else cpu)")
    p.add_argument("--op", action="append", default=None,
                   help="check only this op (repeatable; default: every op)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main_check(args) -> int:
    import torch

    from dinofast import _checks

    unknown = [op for op in args.op or [] if op not in _checks.CHECKS]
    if unknown:
        print(f"dinofast check: error: --op: expected one of {sorted(_checks.CHECKS)}, got {unknown[0]!r}",
              file=sys.stderr)
        return 2
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
    except (RuntimeError, ValueError):
        device = None
    if (device is None or device.type not in ("cpu", "cuda")
            or (device.type == "cuda" and not torch.cuda.is_available())):
        print(f"dinofast check: error: --device: expected auto, cpu or an available cuda device, got {args.device!r}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    text, failures = _checks.run_checks(device, args.op)
    print(text, flush=True)
    return 1 if failures else 0


def _run_subcommand(name: str, argv: list[str]) -> int:
    module_name, summary = SUBCOMMANDS[name]
    if name == "check":
        parser = add_arguments(Parser(prog="dinofast check", description=summary + "."))
        return main_check(parser.parse_args(argv))
    module = importlib.import_module(module_name)
    if hasattr(module, "add_arguments"):
        parser = module.add_arguments(Parser(prog=f"dinofast {name}", description=module.__doc__ or summary))
        return module.main(parser.parse_args(argv)) or 0
    return module.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv and argv[0] == "--version":
        print(f"dinofast {_version()}")
        return 0
    if argv and argv[0] in SUBCOMMANDS:
        return _run_subcommand(argv[0], argv[1:])
    if argv and not argv[0].startswith("-"):
        print(f"dinofast: error: unknown subcommand {argv[0]!r}; expected one of {', '.join(SUBCOMMANDS)} "
              "(see dinofast --help)", file=sys.stderr)
        return 2
    return _run_subcommand("check", argv)  # options only: the default subcommand


def cli(argv: list[str] | None = None) -> int:
    """The `dinofast` executable and `python -m dinofast` (main, for a process of its own): `extract`
    runs with glibc keeping freed memory (see keep_freed_memory)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "extract":
        keep_freed_memory()
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
