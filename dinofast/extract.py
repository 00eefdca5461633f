"""`dinofast extract`: DINOv3 features for a folder of images, packed by token budget, resumable,
scaled out with torchrun.

Output directory layout:
    extract_config.json             the settings the features were made with, the model identified
                                    by a fingerprint of its weights and config (checked on resume)
    features-r{rank}-{seq}.safetensors   shards; per image `{id}/cls [D]`, `{id}/registers [R, D]`,
                                    `{id}/patches [Hp, Wp, D]` (+ `{id}/layers.{i}.*` with --layers)
    index.jsonl                     one JSON line per image: path, status ("ok" / "error"), shard,
                                    keys, grid [Hp, Wp], size [H, W] fed to the model,
                                    original_size [H, W] (after EXIF orientation), file, error
    index.r{rank}.jsonl             per-rank parts while running; rank 0 merges them into
                                    index.jsonl at the end and removes them

Paths: `path` is the image's path as listed (relative to an --images directory, or as a glob
matched it) and `file` the file it was read from, symlinks resolved. File names that are not valid
UTF-8 are kept losslessly: os.fsdecode's surrogates, which JSON writes as \\udcXX escapes, and
os.fsencode(path) gives the original bytes back. `id` is the SHA-1 of those bytes (20 hex digits).

Crash safety: a shard is written as `*.tmp` and renamed once complete; its index lines are
appended only after the rename, one write per record. A re-run cuts a torn last line, removes
`*.tmp` files, shards no index line points to and shards whose records are incomplete (their images
are done again), and skips every image the index records (errors too, unless --retry-errors).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import errno
import fnmatch
import glob
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dinofast._cli import (
    Parser,
    UsageError,
    one_line,
    positive_float,
    positive_int,
    say,
    show_path,
)
from dinofast.data.processor import Grid, ImageProcessor, image_size
from dinofast.data.sampler import TokenBudgetSampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
INDEX = "index.jsonl"
CONFIG = "extract_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings stored in extract_config.json for information only: a resume may change them.
INFO_KEYS = ("model",)
# Directory levels a listing descends at most (symlinked directories are followed, each real
# directory once, so a symlink loop ends; this bounds pathological but loop-free trees).
MAX_DEPTH = 64
SUMMARY = "features for a folder or glob of images (resumable, torchrun-ready)"


# ---- command line --------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", help="a transformers DINOv3 directory or an original-layout .pth/.safetensors file "
                                   "(anything dinofast.load_dinov3 reads); required unless --check")
    p.add_argument("--images", help="a directory (searched recursively for image extensions, symlinks "
                                    "followed, each file once) or a glob pattern ('**' for any depth, quote it); "
                                    "required unless --check")
    p.add_argument("--out", required=True, help="output directory (created; running again resumes)")
    p.add_argument("--max-side", type=positive_int, default=768,
                   help="longest side in pixels an image is resized to (at least the patch size)")
    p.add_argument("--max-tokens-per-batch", type=positive_int, default=16384,
                   help="encoder tokens (CLS + registers + patches) per packed batch")
    p.add_argument("--layers", type=int, nargs="+", default=[],
                   help="also store the outputs of these transformer layers, before the final norm, as "
                        "{id}/layers.{i}.cls|registers|patches with i counted from 0: indices are 0-based, "
                        "negative ones count from the end (-1 = the last layer before the norm, as in "
                        "encode_packed's output_layers and transformers' hidden_states[-1]). The final "
                        "normed output is always stored as {id}/cls, registers, patches (default: none)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and feature dtype")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--shard-mb", type=positive_float, default=1024.0, help="start a new shard past this many MiB")
    p.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="image decoding threads")
    p.add_argument("--retry-errors", action="store_true",
                   help="on resume, try again the images recorded with status 'error'")
    p.add_argument("--check", action="store_true",
                   help="write nothing: verify that --out holds a complete, consistent output (every "
                        "indexed tensor present with its shape, no leftovers; against --model's "
                        "fingerprint and --images' list when given); exit 0 if so, 1 if not")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_parser(prog: str = "dinofast extract") -> argparse.ArgumentParser:
    return add_arguments(Parser(prog=prog, description=__doc__))


def main(argv=None) -> int:
    """`dinofast extract ARGS`: argv (a list, default sys.argv[1:]) or an already parsed Namespace.
    Returns the exit status: 0 done, 1 --check found problems or the disk filled up, 2 bad arguments."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    try:
        if args.check:
            return check_output(args)
        if args.model is None or args.images is None:
            raise UsageError("--model and --images are required (unless --check)")
        run(args)
        return 0
    except UsageError as err:
        say(f"dinofast extract: error: {err}")
        return 2
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            say(f"dinofast extract: error: no space left on the device writing "
                f"{show_path(err.filename or args.out)}; every image indexed so far is kept: free space and "
                "run the same command again to resume")
            return 1
        raise


# ---- validation (before anything is written) -----------------------------------------------------

def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: expected a device index below {torch.cuda.device_count()}, "
                             f"got {dev.index}")
    elif dev.type != "cpu":
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    return dev


def check_out_dir(out: str) -> None:
    """--out must be a writable directory or a path one can be created at."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {show_path(out)}: expected a directory (new, or from an earlier run), "
                             "got an existing file")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {show_path(out)}: the directory is not writable (--check verifies a "
                             "completed output without writing)")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {show_path(out)}: cannot be created ({show_path(parent)} is not a writable "
                         "directory)")


def load_model(path: str, dtype: torch.dtype, device: torch.device):
    from dinofast import models

    if not os.path.exists(path):
        raise UsageError(f"--model {show_path(path)}: no such file or directory")
    try:
        model = models.load_dinov3(path, dtype=dtype, device=device)
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        raise UsageError(f"--model {show_path(path)}: {one_line(err)}") from None
    return model.eval()


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """--layers values as sorted non-negative layer indices (negative ones count from the end)."""
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise UsageError(f"--layers: expected layer indices in [-{num_layers}, {num_layers - 1}] "
                         f"({num_layers} layers), got {bad}")
    return sorted({i % num_layers for i in layers})


# Config entries that name where or how the model was saved, not what it computes.
_CONFIG_NOT_IDENTITY = {"transformers_version", "architectures", "name_or_path", "dtype", "torch_dtype",
                        "output_hidden_states", "output_attentions", "return_dict", "use_cache"}


def model_fingerprint(model) -> str:
    """A hash of what the model computes: every tensor of its state dict (name, dtype, shape,
    bytes, as loaded and cast to the run dtype) and its architecture config (minus entries that
    name where or how it was saved). The same weights read from another path or layout (an
    original .pth and its converted directory) give the same fingerprint; other weights do not."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_NOT_IDENTITY}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


# ---- distributed helpers (no-ops in a single process) --------------------------------------------

class Dist:
    """Rank/world from torchrun's environment; a process group only when world_size > 1."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"backend": backend, "timeout": datetime.timedelta(hours=6)}
            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL object collectives use the current device
                kwargs["device_id"] = device
            torch.distributed.init_process_group(**kwargs)
            self.owns_group = True
        self.active = self.world_size > 1

    def broadcast(self, obj):
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self):
        if self.owns_group:
            torch.distributed.destroy_process_group()


# ---- listing ---------------------------------------------------------------------------------------

def _scan(root: str, max_depth: int) -> Iterator[tuple[str, list[str]]]:
    """(file path, its components below root) for every file under root, sorted, symlinked
    directories followed but each real directory entered once (a symlink loop ends), at most
    max_depth levels down. Unreadable directories are skipped."""
    entered = set()

    def visit(path: str, parts: list[str]):
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in entered:
                return
            entered.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(path), key=lambda e: os.fsencode(e.name))
        except OSError:
            return
        for e in entries:
            try:
                if e.is_dir():
                    if len(parts) < max_depth:
                        yield from visit(e.path, parts + [e.name])
                elif e.is_file():
                    yield e.path, parts + [e.name]
            except OSError:
                continue

    yield from visit(root, [])


def _match(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """glob semantics per path component: '**' matches any number of directories, '*' never a
    leading dot."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def _dedupe(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sorted by recorded path; the first path of each real file kept, `file` made its real path."""
    out, seen = [], set()
    for recorded, path in sorted(found, key=lambda p: os.fsencode(p[0])):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        out.append((recorded, os.path.realpath(path)))
    return out


def list_images(spec: str) -> list[tuple[str, str]]:
    """(recorded path, file) pairs sorted by the recorded path's bytes, each real file once.

    A directory is searched recursively for IMAGE_EXTENSIONS and paths are recorded relative to it;
    a glob pattern's matches (any file; '**' any depth) are recorded as glob.glob would write them.
    File names may hold any bytes. Raises UsageError when nothing matches."""
    if os.path.isdir(spec):
        found = [("/".join(parts), path) for path, parts in _scan(spec, MAX_DEPTH)
                 if parts[-1].lower().endswith(IMAGE_EXTENSIONS)]
        what = "directory holds no image files (" + ", ".join(IMAGE_EXTENSIONS) + ")"
    elif not glob.has_magic(spec):
        found = [(spec, spec)] if os.path.isfile(spec) else []
        what = "is not a file or directory"
    else:
        components = spec.split(os.sep)
        fixed = 0
        while fixed < len(components) - 1 and not glob.has_magic(components[fixed]):
            fixed += 1
        root_parts, pattern = components[:fixed], components[fixed:]
        root = os.sep.join(root_parts) if root_parts else os.curdir
        if root_parts == [""]:
            root = os.sep
        depth = MAX_DEPTH if "**" in pattern else len(pattern) - 1
        prefix = os.sep.join(root_parts)
        found = [(os.path.join(prefix, *parts) if root_parts else os.path.join(*parts), path)
                 for path, parts in _scan(root, depth) if _match(parts, pattern)]
        what = "glob matches no files"
    found = _dedupe(found)
    if not found:
        raise UsageError(f"--images {show_path(spec)}: {what}")
    return found


def image_id(path: str) -> str:
    """The id of an image recorded as `path`: SHA-1 of its bytes (any bytes, os.fsencode)."""
    return hashlib.sha1(os.fsencode(path)).hexdigest()[:20]


# ---- the index -----------------------------------------------------------------------------------

def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file; a line that does not parse (a torn last line) is ignored."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    return out


def torn_tail(path: str) -> int:
    """Bytes after the last newline of `path` (a line cut short by a crash or a full disk); 0 when none."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb") as f:
        back = min(size, 1 << 20)
        f.seek(size - back)
        tail = f.read()
    if tail.endswith(b"\n"):
        return 0
    cut = tail.rfind(b"\n")
    return back - (cut + 1) if cut >= 0 else size if back == size else back


def repair_jsonl(path: str) -> None:
    """Cut a torn last line so that the next append starts a line of its own (its record is redone)."""
    torn = torn_tail(path)
    if torn:
        with open(path, "rb+") as f:
            f.truncate(os.path.getsize(path) - torn)
            os.fsync(f.fileno())


def part_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "index.r*.jsonl")))


def load_records(out_dir: str, drop_missing: bool = True) -> dict[str, dict]:
    """Current state, read-only: index.jsonl, then the parts (later records win, except that an
    error never hides an ok record); ok records whose shard is gone are dropped (drop_missing), so
    those images are done again. Insertion order is index order."""
    records: dict[str, dict] = {}
    exists: dict[str, bool] = {}
    for path in [os.path.join(out_dir, INDEX)] + part_files(out_dir):
        for r in read_jsonl(path):
            if r.get("status") == "ok":
                if r["shard"] not in exists:
                    exists[r["shard"]] = os.path.isfile(os.path.join(out_dir, r["shard"]))
                if drop_missing and not exists[r["shard"]]:
                    continue
            if r.get("status") == "error" and records.get(r["path"], {}).get("status") == "ok":
                continue
            records[r["path"]] = r
    return records


def _shard_keys(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def incomplete_shards(out_dir: str, records: dict[str, dict]) -> list[str]:
    """Shards holding tensors that no record claims (a crash or full disk between a shard's
    rename and the last of its index lines)."""
    claimed: dict[str, set] = {}
    for r in records.values():
        if r.get("status") == "ok":
            claimed.setdefault(r["shard"], set()).update(r["keys"])
    bad = []
    for shard, keys in claimed.items():
        try:
            if not set(_shard_keys(os.path.join(out_dir, shard))) <= keys:
                bad.append(shard)
        except Exception:  # noqa: BLE001 -- an unreadable shard (any error) is redone like an incomplete one
            bad.append(shard)
    return bad


def prepare_resume(out_dir: str) -> dict[str, dict]:
    """Make the directory consistent before a run adds to it: cut torn index lines, drop the
    records of incomplete shards, remove unfinished (*.tmp), incomplete and unindexed shards.
    Returns the records that stand."""
    for path in [os.path.join(out_dir, INDEX)] + part_files(out_dir):
        repair_jsonl(path)
    records = load_records(out_dir)
    bad = set(incomplete_shards(out_dir, records))
    if bad:
        records = {p: r for p, r in records.items() if r.get("shard") not in bad}
    live = {r["shard"] for r in records.values() if r.get("status") == "ok"}
    for path in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")):
        os.remove(path)
    for path in glob.glob(os.path.join(glob.escape(out_dir), "features-r*.safetensors")):
        if os.path.basename(path) not in live:
            os.remove(path)
    return records


def write_index(out_dir: str, records: dict[str, dict]) -> None:
    tmp = os.path.join(out_dir, INDEX + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(json.dumps(records[path], sort_keys=True).encode("ascii") + b"\n"
                     for path in sorted(records, key=os.fsencode))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, INDEX))


def merge_index(out_dir: str) -> dict[str, dict]:
    """index.jsonl := every standing record, sorted by path bytes; the parts removed."""
    parts = part_files(out_dir)
    records = load_records(out_dir)
    if parts or not os.path.exists(os.path.join(out_dir, INDEX)):
        write_index(out_dir, records)
        for part in parts:
            os.remove(part)
    return records


def compared_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in INFO_KEYS}


def config_conflict(out_dir: str, config: dict) -> str | None:
    """Why features made with `config` may not join those in out_dir (None when they may). Read-only."""
    path = os.path.join(out_dir, CONFIG)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    a, b = compared_config(old), compared_config(config)
    if a == b:
        return None
    parts = []
    if a.get("model_fingerprint") != b.get("model_fingerprint"):
        parts.append(f"another model: stored fingerprint {a.get('model_fingerprint')} (from {old.get('model')}), "
                     f"--model {config.get('model')} has {b.get('model_fingerprint')}")
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k != "model_fingerprint" and a.get(k) != b.get(k)}
    if diff:
        parts.append(f"other settings {diff} (stored, now)")
    return (f"--out {show_path(out_dir)} holds features made with " + "; ".join(parts)
            + ": use another --out or the same model and settings")


def write_config(out_dir: str, config: dict) -> None:
    path = os.path.join(out_dir, CONFIG)
    if os.path.exists(path):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ---- shards --------------------------------------------------------------------------------------

def current_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it the racy way, once per writer
    os.umask(mask)
    return mask


_write = os.write  # the one call that appends index lines (tests simulate a full disk here)


def append_lines(path: str, records: list[dict]) -> None:
    """Append one JSON line per record, each with a single write to an O_APPEND file; a write cut
    short (disk full) is undone to the previous end and raised as ENOSPC, so the file never ends
    in half a line that a later append would run into."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        for r in records:
            line = json.dumps(r, sort_keys=True).encode("ascii") + b"\n"
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = _write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            except OSError:
                try:
                    os.ftruncate(fd, end)
                except OSError:
                    pass  # left torn: repair_jsonl cuts it on resume
                raise
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Collects per-image tensors; writes `features-r{rank}-{seq}.safetensors` through a temporary
    name, then appends the images' records to this rank's index part."""

    def __init__(self, out_dir: str, rank: int, max_bytes: int):
        self.out_dir, self.rank, self.max_bytes = out_dir, rank, max_bytes
        prefix = f"features-r{rank:03d}-"
        taken = glob.glob(os.path.join(glob.escape(out_dir), prefix + "*.safetensors"))
        self.seq = 1 + max([int(os.path.basename(p)[len(prefix):].split(".")[0]) for p in taken] or [-1])
        self.part = os.path.join(out_dir, f"index.r{rank:03d}.jsonl")
        self.mode = 0o666 & ~current_umask()
        self.tensors: dict[str, torch.Tensor] = {}
        self.pending: list[dict] = []
        self.bytes = 0
        self.shards_written = 0

    def add(self, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors.update(tensors)
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self.pending.append(record)
        if self.bytes >= self.max_bytes:
            self.flush()

    def record_error(self, record: dict) -> None:
        append_lines(self.part, [record])

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"features-r{self.rank:03d}-{self.seq:05d}.safetensors"
        final = os.path.join(self.out_dir, name)
        tmp = final + ".tmp"
        save_shard(self.tensors, tmp)
        os.chmod(tmp, self.mode)  # safetensors creates files 0600; the index honours the umask
        os.replace(tmp, final)
        for r in self.pending:
            r["shard"] = name
        append_lines(self.part, self.pending)
        self.seq += 1
        self.shards_written += 1
        self.tensors, self.pending, self.bytes = {}, [], 0


def save_shard(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "dinofast-features"})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def flatten(result, prefix: str) -> dict[str, torch.Tensor]:
    """encode_packed's per-image result (ImageFeatures or a dict) -> flat safetensors keys
    `{prefix}/cls`, `{prefix}/registers`, `{prefix}/patches`, nested parts joined with '.'
    (`{prefix}/layers.3.patches`). Each tensor gets its own CPU storage (safetensors refuses
    views that share one)."""
    out: dict[str, torch.Tensor] = {}

    def walk(obj, name):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        if isinstance(obj, torch.Tensor):
            out[f"{prefix}/{name}"] = obj.detach().to("cpu", copy=True).contiguous()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for k, v in enumerate(obj):
                walk(v, f"{name}.{k}" if name else str(k))

    walk(result, "")
    return out


# ---- --check -------------------------------------------------------------------------------------

def check_output(args) -> int:
    """Verify a completed output without writing to it. Returns 0 when consistent, 1 when not."""
    from safetensors import safe_open

    out = args.out
    if not os.path.isdir(out):
        raise UsageError(f"--out {show_path(out)}: expected the directory of an extract run, got none")
    problems: list[str] = []
    config_path = os.path.join(out, CONFIG)
    config = {}
    if not os.path.exists(config_path):
        problems.append(f"{CONFIG} is missing")
    else:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    if not os.path.exists(os.path.join(out, INDEX)):
        problems.append(f"{INDEX} is missing (the run has not finished)")
    for path in [os.path.join(out, INDEX)] + part_files(out):
        if torn_tail(path):
            problems.append(f"{os.path.basename(path)} ends in a torn line")
    if part_files(out):
        problems.append(f"per-rank index parts left ({len(part_files(out))}): the run has not finished")
    leftovers = [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out), "*.tmp"))]
    if leftovers:
        problems.append(f"unfinished files {leftovers}")
    records = load_records(out, drop_missing=False)
    by_shard: dict[str, list[dict]] = {}
    for r in records.values():
        if r.get("status") == "ok":
            by_shard.setdefault(r["shard"], []).append(r)
    D = config.get("hidden_size")
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out), "features-r*.safetensors")))
    for shard in shards:
        if shard not in by_shard:
            problems.append(f"{shard}: no index record points to it")
    for shard, recs in by_shard.items():
        if not os.path.isfile(os.path.join(out, shard)):
            problems.append(f"{shard} is missing ({len(recs)} image(s) indexed in it)")
            continue
        try:
            with safe_open(os.path.join(out, shard), framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
        except Exception as err:  # noqa: BLE001 -- any unreadable shard is a problem to report
            problems.append(f"{shard}: unreadable ({one_line(err)})")
            continue
        claimed = set()
        for r in recs:
            claimed.update(r["keys"])
            for k in r["keys"]:
                if k not in shapes:
                    problems.append(f"{show_path(r['path'])}: {k} missing from {shard}")
                elif k.endswith("patches") and D is not None and shapes[k] != [*r["grid"], D]:
                    problems.append(f"{show_path(r['path'])}: {k} has shape {shapes[k]}, expected {[*r['grid'], D]}")
        if set(shapes) - claimed:
            problems.append(f"{shard}: {len(set(shapes) - claimed)} tensor(s) no record claims")
    if args.model is not None:
        device = pick_device(args.device)
        model = load_model(args.model, DTYPES[config.get("dtype", args.dtype)], device)
        fp = model_fingerprint(model)
        if config.get("model_fingerprint") != fp:
            problems.append(f"made with the model of fingerprint {config.get('model_fingerprint')}, --model "
                            f"{show_path(args.model)} has {fp}")
    missing = 0
    if args.images is not None:
        missing = sum(p not in records for p, _ in list_images(args.images))
        if missing:
            problems.append(f"{missing} image(s) of --images are not in the index")
    ok = sum(r.get("status") == "ok" for r in records.values())
    head = (f"dinofast extract --check: {show_path(out)}: {len(records)} records ({ok} ok, {len(records) - ok} "
            f"error), {len(shards)} shard(s)")
    if problems:
        print(f"{head}: FAIL", flush=True)
        for p in problems[:20]:
            print(f"  {p}", flush=True)
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20} more", flush=True)
        return 1
    print(f"{head}: OK", flush=True)
    return 0


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class Item:
    path: str  # as recorded in the index
    file: str  # where to read it (symlinks resolved)
    original_size: tuple[int, int]
    grid: Grid


@dataclass
class Summary:
    rank: int
    done: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    shards: int = 0
    error_paths: list[str] = field(default_factory=list)


def _header(args) -> tuple[str, str, tuple[int, int] | None, str | None]:
    path, file = args
    try:
        return path, file, image_size(file), None
    except Exception as err:  # noqa: BLE001 -- any unreadable file becomes an index record, never a crash
        return path, file, None, f"{type(err).__name__}: {err}"


def _decode(item: Item, processor: ImageProcessor):
    from PIL import Image

    try:
        with Image.open(item.file) as im:
            im.load()
            pixels, grid = processor(im)
        return pixels, grid, None
    except Exception as err:  # noqa: BLE001 -- as in _header
        return None, None, f"{type(err).__name__}: {err}"


def _error_record(path: str, file: str, original_size, message: str) -> dict:
    return {"path": path, "file": file, "status": "error", "error": message,
            "original_size": list(original_size) if original_size else None}


def run(args) -> Summary:
    """Validate everything (device, --out, model, settings) before touching the disk, then extract."""
    device = pick_device(args.device)
    check_out_dir(args.out)
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, dtype, device)
    cfg = model.config
    patch_size = int(cfg.patch_size)
    if args.max_side < patch_size:
        raise UsageError(f"--max-side: expected at least the patch size {patch_size}, got {args.max_side}")
    output_layers = resolve_layers(args.layers, int(cfg.num_hidden_layers))
    dist = Dist(device)
    try:
        return _run(args, device, dist, model, output_layers)
    finally:
        dist.close()


def _plan(args, model, output_layers) -> tuple[list[tuple[str, str]], int]:
    """Rank 0: list the images, check the settings against the output, then (only now) create and
    repair the output; returns (images left to do, images already done)."""
    cfg = model.config
    config = {
        "model": os.path.abspath(args.model), "model_fingerprint": model_fingerprint(model),
        "max_side": args.max_side, "patch_size": int(cfg.patch_size), "dtype": args.dtype,
        "layers": output_layers, "num_layers": int(cfg.num_hidden_layers), "hidden_size": int(cfg.hidden_size),
    }
    images = list_images(args.images)
    if os.path.isdir(args.out):
        conflict = config_conflict(args.out, config)
        if conflict:
            raise UsageError(conflict)
    os.makedirs(args.out, exist_ok=True)
    write_config(args.out, config)
    records = prepare_resume(args.out)
    if args.retry_errors:
        records = {p: r for p, r in records.items() if r.get("status") == "ok"}
    return [p for p in images if p[0] not in records], len(records)


def _run(args, device, dist: Dist, model, output_layers) -> Summary:
    from dinofast import models

    out_dir = args.out
    dtype = DTYPES[args.dtype]
    cfg = model.config
    patch_size = int(cfg.patch_size)
    num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0))
    processor = ImageProcessor(patch_size=patch_size, max_side=args.max_side)

    # rank 0 decides what is left to do; everyone gets the same list (or rank 0's reason to stop,
    # so that no rank waits for a list that never comes, and only rank 0 prints it)
    plan = None
    if dist.rank == 0:
        try:
            plan = _plan(args, model, output_layers)
        except UsageError as stop:
            plan = str(stop)
    plan = dist.broadcast(plan)
    if isinstance(plan, str):
        raise UsageError(plan)
    todo, skipped = plan
    summary = Summary(rank=dist.rank)
    writer = ShardWriter(out_dir, dist.rank, int(args.shard_mb * 2**20))
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(max(1, args.workers)) as pool:
        # Each rank reads the headers of a strided share (no pixels decoded); the sizes are then
        # shared so that every rank plans the same token-budget batches and takes every
        # world_size-th one: ranks get batch counts within one of each other, each batch holds
        # images of similar size, and every image goes to exactly one rank.
        readable = []
        for path, file, size, err in pool.map(_header, todo[dist.rank :: dist.world_size]):
            if err is not None:
                writer.record_error(_error_record(path, file, None, err))
                summary.errors += 1
                summary.error_paths.append(path)
            else:
                readable.append((path, file, size))
        items = [Item(path, file, tuple(size), processor.grid_for_size(*size))
                 for share in dist.gather(readable) for path, file, size in share]
        counts = [num_prefix + it.grid.num_patches for it in items]
        batches = []
        if items:
            budget = args.max_tokens_per_batch
            if dist.world_size > 1:
                # a small list must still make batches for every rank: at least ~8 per rank, so that
                # dealing whole batches leaves the ranks within about one small batch of each other
                budget = min(budget, max(1, -(-sum(counts) // (8 * dist.world_size))))
            with warnings.catch_warnings():  # the sampler's oversize warning would name the cap
                warnings.simplefilter("ignore", RuntimeWarning)
                batches = list(TokenBudgetSampler(counts, budget, shuffle=False,
                                                  rank=dist.rank, world_size=dist.world_size))
            oversize = sum(c > args.max_tokens_per_batch for c in counts)
            if oversize and dist.rank == 0:
                warnings.warn(f"dinofast extract: {oversize} image(s) exceed --max-tokens-per-batch="
                              f"{args.max_tokens_per_batch} on their own; each is encoded alone", RuntimeWarning)
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            desc = "extract" if dist.world_size == 1 else f"extract rank {dist.rank}"
            # rate_noinv: always "N images/s", never tqdm's "s/image" for slow rates
            bar = tqdm(total=sum(map(len, batches)), unit=" images", desc=desc, position=dist.rank,
                       dynamic_ncols=True, file=sys.stderr,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")
        for batch, decoded in _prefetch(pool, batches, items, processor):
            good, pixels = [], []
            for i, (px, grid, err) in zip(batch, decoded):
                it = items[i]
                if err is not None:
                    writer.record_error(_error_record(it.path, it.file, it.original_size, err))
                    summary.errors += 1
                    summary.error_paths.append(it.path)
                    continue
                good.append((it, grid))
                pixels.append(px.to(device=device, dtype=dtype, non_blocking=True))
            if pixels:
                with torch.inference_mode():
                    results = models.encode_packed(model, pixels, output_layers=output_layers or None)
                for (it, grid), res in zip(good, results):
                    key = image_id(it.path)
                    tensors = flatten(res, key)
                    writer.add({
                        "path": it.path, "file": it.file, "status": "ok", "id": key, "keys": sorted(tensors),
                        "grid": [grid.Hp, grid.Wp], "size": [grid.Hp * patch_size, grid.Wp * patch_size],
                        "original_size": list(it.original_size),
                    }, tensors)
                    summary.done += 1
                    summary.tokens += num_prefix + grid.num_patches
            if bar:
                bar.update(len(batch))
        writer.flush()
    summary.seconds = time.perf_counter() - start
    summary.shards = writer.shards_written
    if bar:
        bar.close()

    summaries = dist.gather(summary)  # also the barrier before the merge
    if dist.rank == 0:
        merged = merge_index(out_dir)
        done = sum(s.done for s in summaries)
        errors = sum(s.errors for s in summaries)
        secs = max(s.seconds for s in summaries) or 1e-9
        print(
            f"dinofast extract: {done} images in {secs:.1f} s ({done / secs:.2f} images/s, "
            f"{sum(s.tokens for s in summaries) / secs:.0f} tokens/s) on {dist.world_size} "
            f"process(es), {device.type}; {errors} error(s); {skipped} already done; "
            f"{sum(s.shards for s in summaries)} new shard(s); index: {show_path(os.path.join(out_dir, INDEX))} "
            f"({len(merged)} records)",
            flush=True,
        )
        for s in summaries:
            for p in s.error_paths:
                print(f"  error: {show_path(p)} (see the index)", flush=True)
    return summary


def _prefetch(pool, batches, items, processor, ahead: int = 2) -> Iterator:
    """Decode the next `ahead` batches in the thread pool while the model runs the current one."""
    queue = []
    it = iter(batches)

    def submit():
        b = next(it, None)
        if b is not None:
            queue.append((b, [pool.submit(_decode, items[i], processor) for i in b]))

    for _ in range(ahead + 1):
        submit()
    while queue:
        b, futures = queue.pop(0)
        decoded = [f.result() for f in futures]
        submit()
        yield b, decoded
