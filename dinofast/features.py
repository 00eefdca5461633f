"""Reading `dinofast extract` outputs: `FeatureStore`, a read-only mapping from image path to its
features that reads only the tensors asked for, a torch Dataset view, and PCA pictures of patch
features (`dinofast pca`).

    store = dinofast.FeatureStore("feats/")
    f = store["photos/cat.jpg"]          # ImageFeatures: cls [D], registers [R, D], patches [Hp, Wp, D], layers
    store.read("photos/cat.jpg", "patches")   # one tensor
    store.pca_image("photos/cat.jpg")    # PIL image: the photo beside its PCA-to-RGB patch map
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import torch

from dinofast import extract
from dinofast._cli import Parser, UsageError, positive_int, say, show_path
from dinofast.models.dinov3 import ImageFeatures

SUMMARY = "pictures of extracted features: each image beside a PCA-to-RGB map of its patches"


class FeatureStore(Mapping):
    """The features of a `dinofast extract` output directory, read-only.

    A Mapping from an image's recorded path (str; bytes are accepted too) to `ImageFeatures`
    (cls [D], registers [R, D], patches [Hp, Wp, D], layers {i: ImageFeatures}), in the dtype they
    were stored in. Only images extracted without error are keys; iteration follows the index
    (index.jsonl, then per-rank parts of an unfinished or multi-rank run). Shards are opened with
    safetensors' safe_open and only the requested image's tensors are read, so memory stays flat
    however many images are iterated; at most `max_open_shards` shards are held open, per process
    (a forked DataLoader worker opens its own).

    .paths: the keys in index order. .errors: {path: error message} of the images that failed.
    .record(path): the index record (grid, size, original_size, file, shard, keys).
    """

    def __init__(self, out_dir, *, max_open_shards: int = 8):
        self.out_dir = os.fspath(out_dir)
        if not os.path.isdir(self.out_dir):
            raise ValueError(f"out_dir: expected a `dinofast extract` output directory, got {self.out_dir!r}")
        if not os.path.exists(os.path.join(self.out_dir, extract.INDEX)) and not extract.part_files(self.out_dir):
            raise ValueError(f"out_dir: expected a directory holding {extract.INDEX}, got {self.out_dir!r} without one")
        records = extract.load_records(self.out_dir)
        self._records = {p: r for p, r in records.items() if r.get("status") == "ok"}
        self.errors: dict[str, str] = {p: r.get("error", "") for p, r in records.items() if r.get("status") != "ok"}
        self.paths: list[str] = list(self._records)
        self.max_open_shards = max_open_shards
        self._handles: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._pid = os.getpid()

    # -- Mapping
    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __contains__(self, path) -> bool:
        return self._key(path) in self._records

    def __getitem__(self, path) -> ImageFeatures:
        r = self.record(path)
        prefix = r["id"] + "/"
        parts: dict[str, torch.Tensor] = {k[len(prefix):]: self._get(r["shard"], k) for k in r["keys"]}
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in parts.items():
            if name.startswith("layers."):
                _, i, what = name.split(".", 2)
                layers.setdefault(int(i), {})[what] = t
        return ImageFeatures(parts["cls"], parts["registers"], parts["patches"],
                             {i: ImageFeatures(v["cls"], v["registers"], v["patches"])
                              for i, v in sorted(layers.items())})

    def __repr__(self) -> str:
        return f"FeatureStore({self.out_dir!r}: {len(self)} images, {len(self.errors)} errors)"

    # -- reading
    def _key(self, path) -> str:
        return os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else path

    def record(self, path) -> dict:
        key = self._key(path)
        try:
            return self._records[key]
        except KeyError:
            why = f" (it failed: {self.errors[key]})" if key in self.errors else ""
            raise KeyError(f"{show_path(key)!r} is not an extracted image of {self.out_dir}{why}") from None

    def read(self, path, name: str = "patches") -> torch.Tensor:
        """One tensor of one image: "cls", "registers", "patches" or "layers.{i}.{cls|registers|patches}"."""
        r = self.record(path)
        key = f"{r['id']}/{name}"
        if key not in r["keys"]:
            have = sorted(k.split("/", 1)[1] for k in r["keys"])
            raise KeyError(f"name: expected one of {have}, got {name!r}")
        return self._get(r["shard"], key)

    def _get(self, shard: str, key: str) -> torch.Tensor:
        return self._handle(shard).get_tensor(key)

    def _handle(self, shard: str):
        from safetensors import safe_open

        if os.getpid() != self._pid:  # a forked worker: never share the parent's handles
            self._handles = collections.OrderedDict()
            self._pid = os.getpid()
        h = self._handles.get(shard)
        if h is None:
            h = safe_open(os.path.join(self.out_dir, shard), framework="pt")
            self._handles[shard] = h
            while len(self._handles) > self.max_open_shards:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return h

    def __getstate__(self):  # pickled into spawned DataLoader workers: handles are not carried
        state = dict(self.__dict__)
        state["_handles"] = collections.OrderedDict()
        return state

    def image_file(self, path, images_root: str | None = None) -> str:
        """The image file `path` was read from: `images_root`/path when given, else the recorded file."""
        r = self.record(path)
        if images_root is not None:
            return os.path.join(images_root, r["path"])
        if "file" in r:
            return r["file"]
        return r["path"]

    def dataset(self, names: Sequence[str] = ("patches",), paths: Sequence[str] | None = None) -> FeatureDataset:
        """A torch Dataset over `paths` (default: all, in index order) whose items are dicts
        {"path": str, name: tensor for each of `names`}."""
        return FeatureDataset(self, names, paths)

    def pca_image(self, path, *, images_root: str | None = None, max_side: int = 512, name: str = "patches"):
        """A PIL image: the image (EXIF-oriented, longest side at most max_side) beside the first
        three principal components of its patch features mapped to RGB and upsampled to the same
        size (the classic DINO picture). name picks the features ("patches", "layers.3.patches")."""
        from PIL import Image

        from dinofast.data.processor import to_rgb

        patches = self.read(path, name)
        with Image.open(self.image_file(path, images_root)) as im:
            photo = to_rgb(im)
        scale = min(1.0, max_side / max(photo.size))
        size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        photo = photo.resize(size, Image.Resampling.BICUBIC)
        rgb = pca_rgb(patches)
        pca = Image.fromarray(rgb.numpy(), "RGB").resize(size, Image.Resampling.BILINEAR)
        gap = max(2, size[0] // 64)
        out = Image.new("RGB", (2 * size[0] + gap, size[1]), (255, 255, 255))
        out.paste(photo, (0, 0))
        out.paste(pca, (size[0] + gap, 0))
        return out


class FeatureDataset(torch.utils.data.Dataset):
    """store.dataset(...): item i -> {"path": path, name: tensor, ...}; safe in DataLoader workers
    (each process opens its own shard handles)."""

    def __init__(self, store: FeatureStore, names: Sequence[str], paths: Sequence[str] | None = None):
        self.store, self.names = store, tuple(names)
        self.paths = list(store.paths if paths is None else paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        item = {"path": path}
        for name in self.names:
            item[name] = self.store.read(path, name)
        return item


def pca_rgb(patches: torch.Tensor) -> torch.Tensor:
    """patches [Hp, Wp, D] -> uint8 [Hp, Wp, 3]: the projections on the first three principal
    components (computed in fp64 over this image's patches), each stretched from its 1st to 99th
    percentile to [0, 255]. Signs are fixed (largest loading positive) so the colours are
    deterministic."""
    Hp, Wp, D = patches.shape
    x = patches.reshape(Hp * Wp, D).double()
    x = x - x.mean(0)
    k = min(3, x.shape[0], D)
    if k == 0 or not torch.isfinite(x).all():
        return torch.zeros(Hp, Wp, 3, dtype=torch.uint8)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:k]
    comps = comps * torch.where(comps.gather(1, comps.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0)
    proj = x @ comps.T  # [N, k]
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - k)], 1)
    return (proj * 255).round().to(torch.uint8).reshape(Hp, Wp, 3)


def contact_sheet(images: Sequence, *, height: int = 160, columns: int = 4):
    """PIL images scaled to `height` and tiled in rows of `columns` on white."""
    from PIL import Image

    thumbs = [im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.BICUBIC)
              for im in images]
    rows = [thumbs[i:i + columns] for i in range(0, len(thumbs), columns)]
    pad = 8
    width = max(sum(t.width for t in row) + pad * (len(row) + 1) for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * (height + pad) + pad), (255, 255, 255))
    y = pad
    for row in rows:
        x = pad
        for t in row:
            sheet.paste(t, (x, y))
            x += t.width + pad
        y += height + pad
    return sheet


def _file_name(i: int, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", show_path(path))[-80:].strip("._") or "image"
    return f"{i:05d}-{os.path.splitext(stem)[0]}.png"


# ---- `dinofast pca` -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("features", metavar="FEATS", help="a `dinofast extract` output directory")
    p.add_argument("--out", required=True, help="directory for the pictures (created)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="pictures of the first N images in index order (default: all)")
    p.add_argument("--images-root", default=None,
                   help="read image PATH from IMAGES_ROOT/PATH instead of the file recorded in the index "
                        "(for features moved to another machine)")
    p.add_argument("--max-side", type=positive_int, default=512, help="longest side of each half of a picture")
    p.add_argument("--layer", type=int, default=None,
                   help="picture the stored output of this layer ({id}/layers.{i}.patches; same indices as "
                        "extract --layers) instead of the final normed patches (default: final output)")
    return p


def build_parser(prog: str = "dinofast pca") -> argparse.ArgumentParser:
    return add_arguments(Parser(prog=prog, description=SUMMARY + ".\n\n" + __doc__))


def main(argv=None) -> int:
    """`dinofast pca FEATS --out DIR`: writes {i:05d}-{name}.png per image and contact_sheet.png."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    try:
        return _pca(args)
    except UsageError as err:
        say(f"dinofast pca: error: {err}")
        return 2


def _pca(args) -> int:
    try:
        store = FeatureStore(args.features)
    except ValueError as err:
        raise UsageError(f"FEATS {err}") from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {show_path(args.out)}: expected a directory, got a file")
    name = "patches"
    if args.layer is not None:
        with open(os.path.join(store.out_dir, extract.CONFIG), encoding="utf-8") as f:
            config = json.load(f)
        stored, num = config.get("layers", []), config.get("num_layers")
        layer = args.layer % num if num and -num <= args.layer < 0 else args.layer
        if layer not in stored:
            raise UsageError(f"--layer: expected one of the stored layers {stored}, got {args.layer}")
        name = f"layers.{layer}.patches"
    paths = store.paths[: args.limit] if args.limit else store.paths
    if not paths:
        raise UsageError(f"FEATS {show_path(store.out_dir)}: no extracted images")
    os.makedirs(args.out, exist_ok=True)
    pictures = []
    for i, path in enumerate(paths):
        try:
            im = store.pca_image(path, images_root=args.images_root, max_side=args.max_side, name=name)
        except OSError as err:
            print(f"dinofast pca: skipped {show_path(path)}: {err}", flush=True)
            continue
        im.save(os.path.join(args.out, _file_name(i, path)))
        pictures.append(im)
    if not pictures:
        raise UsageError("no image file could be read (moved? use --images-root)")
    contact_sheet(pictures).save(os.path.join(args.out, "contact_sheet.png"))
    print(f"dinofast pca: {len(pictures)} picture(s) and contact_sheet.png in {show_path(args.out)}", flush=True)
    return 0
