"""Pieces every `dinofast` subcommand shares: a parser whose errors are one line and exit 2 (printed
by rank 0 only under torchrun), argument types with the same messages everywhere, and printing of
paths whose bytes are not valid UTF-8."""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys


class UsageError(Exception):
    """A bad argument or input, found before anything was written: one line, exit status 2."""


def rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def say(message: str, file=None) -> None:
    """Print `message` once per job: on rank 0 only under torchrun."""
    if rank() == 0:
        print(message, file=file or sys.stderr, flush=True)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory for reuse in this process; True where it took effect.

    glibc hands freed memory at the top of its heap back to the system once more than 64 MiB of it
    is free, so a forward over thousands of packed tokens, whose [T, 4C] intermediates come and go
    every layer, finds those pages unmapped again and page-faults them back in (ViT-B, bf16, 8 mixed
    images, 9,367 tokens: ~97k faults and +10% time per `encode_packed` call, in runs that vary by
    12%). Blocks up to 32 MiB come from the heap (glibc's own dynamic ceiling) and the heap is never
    trimmed: the process keeps its peak footprint. Process-wide, so only command-line entry points
    that own their process call it (`dinofast extract`); a library user gets the same with
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment. No-op
    (False) where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that rank 0 alone prints, and defaults shown."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        say(f"{self.prog}: error: {message} (see {self.prog} --help)")
        self.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" where a help text lacks it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) \
                and not action.required and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _positive(text: str, cast, kind: str):
    """argparse type: text as a finite number > 0 of type cast; the message names what came."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def positive_int(text: str) -> int:
    return _positive(text, int, "integer")


def positive_float(text: str) -> float:
    return _positive(text, float, "number")


def show_path(path: str) -> str:
    """A path for messages: bytes that are not UTF-8 (kept by os.fsdecode as surrogates) shown as
    \\xNN instead of making print() raise UnicodeEncodeError."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
