"""`dinofast extract`: DINOv3 features for a folder of images, packed by token budget, resumable,
scaled out with torchrun.

Output directory layout:
    extract_config.json             the settings the features were made with (checked on resume)
    features-r{rank}-{seq}.safetensors   shards; per image `{id}/cls [D]`, `{id}/registers [R, D]`,
                                    `{id}/patches [Hp, Wp, D]` (+ `{id}/layers.{i}.*` when asked)
    index.jsonl                     one JSON line per image: path, status ("ok" / "error"), shard,
                                    keys, grid [Hp, Wp], size [H, W] fed to the model,
                                    original_size [H, W] (after EXIF orientation), error
    index.r{rank}.jsonl             per-rank parts while running; rank 0 merges them into
                                    index.jsonl at the end and removes them

Crash safety: a shard is written as `*.tmp` and renamed once complete; its index lines are
appended only after the rename. A re-run removes `*.tmp` files and shards no index line points to,
and skips every image the index (or a part left by an interrupted run) records, ok or error.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from dinofast.data.processor import Grid, ImageProcessor, image_size
from dinofast.data.sampler import TokenBudgetSampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
INDEX = "index.jsonl"
CONFIG = "extract_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- command line --------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="transformers directory or original .pth/.safetensors (dinofast.load_dinov3)")
    p.add_argument("--images", required=True, help="a directory (searched recursively) or a glob pattern")
    p.add_argument("--out", required=True, help="output directory (created; re-running resumes)")
    p.add_argument("--max-side", type=int, default=768, help="longest side in pixels (default 768)")
    p.add_argument("--max-tokens-per-batch", type=int, default=16384,
                   help="encoder tokens (CLS + registers + patches) per packed batch (default 16384)")
    p.add_argument("--layers", type=int, nargs="+", default=[-1],
                   help="-1: the final (normed) output, stored as {id}/cls, registers, patches; other "
                        "values are transformer layer indices (0-based; negative from the end except -1) "
                        "whose outputs before the final norm are stored as {id}/layers.{i}.* (default -1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is there, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--shard-mb", type=float, default=1024.0, help="start a new shard past this many MiB (default 1024)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="dinofast extract", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    for name in ("max_side", "max_tokens_per_batch", "shard_mb", "workers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    run(args)
    return 0


# ---- distributed helpers (no-ops in a single process) --------------------------------------------

class Dist:
    """Rank/world from torchrun's environment; a process group only when world_size > 1."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = dict(backend=backend, timeout=datetime.timedelta(hours=6))
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


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


# ---- listing and the index -----------------------------------------------------------------------

def list_images(spec: str) -> List[Tuple[str, str]]:
    """(recorded path, file path) pairs, sorted. A directory is searched recursively for image
    extensions and paths are recorded relative to it; a glob's matches are recorded as matched."""
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs.sort()
            for name in files:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    full = os.path.join(root, name)
                    found.append((os.path.relpath(full, spec).replace(os.sep, "/"), full))
        return sorted(found)
    matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
    if not matches:
        raise SystemExit(f"dinofast extract: --images {spec!r} is neither a directory nor a glob matching files")
    return [(m, m) for m in matches]


def image_id(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:20]


def read_jsonl(path: str) -> List[dict]:
    """Records of a JSONL file; a last line cut short by a crash is ignored."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def part_files(out_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(out_dir, "index.r*.jsonl")))


def load_records(out_dir: str) -> Dict[str, dict]:
    """Current state: index.jsonl, then the parts (later records win); ok records whose shard is
    gone are dropped, so those images are done again."""
    records: Dict[str, dict] = {}
    for path in [os.path.join(out_dir, INDEX)] + part_files(out_dir):
        for r in read_jsonl(path):
            if r.get("status") == "ok" and not os.path.exists(os.path.join(out_dir, r["shard"])):
                continue
            if r.get("status") == "error" and records.get(r["path"], {}).get("status") == "ok":
                continue
            records[r["path"]] = r
    return records


def cleanup(out_dir: str, records: Dict[str, dict]) -> None:
    """Remove unfinished shards (*.tmp) and shards no index record points to (renamed but not yet
    indexed when a run stopped)."""
    live = {r["shard"] for r in records.values() if r.get("status") == "ok"}
    for path in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(path)
    for path in glob.glob(os.path.join(out_dir, "features-r*.safetensors")):
        if os.path.basename(path) not in live:
            os.remove(path)


def merge_index(out_dir: str) -> Dict[str, dict]:
    records = load_records(out_dir)
    tmp = os.path.join(out_dir, INDEX + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for path in sorted(records):
            f.write(json.dumps(records[path], sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, INDEX))
    for part in part_files(out_dir):
        os.remove(part)
    return records


def check_config(out_dir: str, config: dict) -> None:
    """Features of one output directory come from one setting; a resume with other settings stops."""
    path = os.path.join(out_dir, CONFIG)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != config:
            diff = {k: (old.get(k), config.get(k)) for k in set(old) | set(config) if old.get(k) != config.get(k)}
            raise SystemExit(
                f"dinofast extract: {out_dir} holds features made with other settings {diff} "
                "(stored, now); use another --out or the same settings")
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ---- shards --------------------------------------------------------------------------------------

class ShardWriter:
    """Collects per-image tensors; writes `features-r{rank}-{seq}.safetensors` through a temporary
    name, then appends the images' records to this rank's index part."""

    def __init__(self, out_dir: str, rank: int, max_bytes: int):
        self.out_dir, self.rank, self.max_bytes = out_dir, rank, max_bytes
        taken = glob.glob(os.path.join(out_dir, f"features-r{rank:03d}-*.safetensors"))
        self.seq = 1 + max([int(os.path.basename(p)[len(f"features-r{rank:03d}-"):].split(".")[0]) for p in taken] or [-1])
        self.part = os.path.join(out_dir, f"index.r{rank:03d}.jsonl")
        self.tensors: Dict[str, torch.Tensor] = {}
        self.pending: List[dict] = []
        self.bytes = 0
        self.shards_written = 0

    def add(self, record: dict, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors.update(tensors)
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self.pending.append(record)
        if self.bytes >= self.max_bytes:
            self.flush()

    def record_error(self, record: dict) -> None:
        self._append([record])

    def _append(self, records: List[dict]) -> None:
        with open(self.part, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"features-r{self.rank:03d}-{self.seq:05d}.safetensors"
        final = os.path.join(self.out_dir, name)
        tmp = final + ".tmp"
        save_shard(self.tensors, tmp)
        os.replace(tmp, final)
        for r in self.pending:
            r["shard"] = name
        self._append(self.pending)
        self.seq += 1
        self.shards_written += 1
        self.tensors, self.pending, self.bytes = {}, [], 0


def save_shard(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "dinofast-features"})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def flatten(result, prefix: str) -> Dict[str, torch.Tensor]:
    """encode_packed's per-image result (ImageFeatures or a dict) -> flat safetensors keys
    `{prefix}/cls`, `{prefix}/registers`, `{prefix}/patches`, nested parts joined with '.'
    (`{prefix}/layers.3.patches`). Each tensor gets its own CPU storage (safetensors refuses
    views that share one)."""
    out: Dict[str, torch.Tensor] = {}

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


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class Item:
    path: str  # as recorded in the index
    file: str  # where to read it
    original_size: Tuple[int, int]
    grid: Grid


@dataclass
class Summary:
    rank: int
    done: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    shards: int = 0
    error_paths: List[str] = field(default_factory=list)


def _header(args) -> Tuple[str, str, Optional[Tuple[int, int]], Optional[str]]:
    path, file = args
    try:
        return path, file, image_size(file), None
    except Exception as err:  # any unreadable file becomes an index record, never a crash
        return path, file, None, f"{type(err).__name__}: {err}"


def _decode(item: Item, processor: ImageProcessor):
    from PIL import Image

    try:
        with Image.open(item.file) as im:
            im.load()
            pixels, grid = processor(im)
        return pixels, grid, None
    except Exception as err:
        return None, None, f"{type(err).__name__}: {err}"


def _error_record(path: str, original_size, message: str) -> dict:
    return {"path": path, "status": "error", "error": message, "original_size": list(original_size) if original_size else None}


def run(args) -> Summary:
    device = pick_device(args.device)
    dist = Dist(device)
    try:
        return _run(args, device, dist)
    finally:
        dist.close()


def _run(args, device, dist: Dist) -> Summary:
    from dinofast import models

    out_dir = args.out
    dtype = DTYPES[args.dtype]
    os.makedirs(out_dir, exist_ok=True)
    model = models.load_dinov3(args.model, dtype=dtype, device=device)
    model.eval()
    cfg = model.config
    patch_size = int(cfg.patch_size)
    num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0))
    output_layers = sorted({i for i in args.layers if i != -1})
    num_layers = int(cfg.num_hidden_layers)
    bad = [i for i in output_layers if not -num_layers <= i < num_layers]
    if bad:
        raise SystemExit(f"dinofast extract: --layers: expected -1 (final output) or layer indices in "
                         f"[-{num_layers}, {num_layers - 1}] ({num_layers} layers), got {bad}")
    processor = ImageProcessor(patch_size=patch_size, max_side=args.max_side)
    config = {
        "model": os.path.abspath(args.model), "max_side": args.max_side, "patch_size": patch_size,
        "dtype": args.dtype, "layers": sorted(set(args.layers)), "hidden_size": int(cfg.hidden_size),
    }

    # rank 0 decides what is left to do; everyone gets the same list (or rank 0's reason to stop,
    # so that no rank waits for a list that never comes)
    plan = None
    if dist.rank == 0:
        try:
            check_config(out_dir, config)
            records = load_records(out_dir)
            cleanup(out_dir, records)
            plan = [p for p in list_images(args.images) if p[0] not in records]
            skipped = len(records)
        except SystemExit as stop:
            plan = str(stop)
    plan = dist.broadcast(plan)
    if isinstance(plan, str):
        raise SystemExit(plan)
    todo = plan
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
                writer.record_error(_error_record(path, None, err))
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
                    writer.record_error(_error_record(it.path, it.original_size, err))
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
                        "path": it.path, "status": "ok", "id": key, "keys": sorted(tensors),
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
            f"{sum(s.shards for s in summaries)} new shard(s); index: {os.path.join(out_dir, INDEX)} "
            f"({len(merged)} records)",
            flush=True,
        )
        for s in summaries:
            for p in s.error_paths:
                print(f"  error: {p} (see the index)", flush=True)
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
