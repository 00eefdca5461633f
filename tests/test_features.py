"""dinofast.FeatureStore and `dinofast pca`: the store against the shards it reads, flat memory over
10,000 images, multi-rank and unfinished outputs, DataLoader workers, and pictures of the right size."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import dinofast
from dinofast import extract, features
from tests.test_extract import args_for, image_dir, model_dir, read_output  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def extracted(model_dir, image_dir, tmp_path_factory):  # noqa: F811
    images, good, bad = image_dir
    out = str(tmp_path_factory.mktemp("feats") / "o")
    assert extract.main(args_for(model_dir, images, out, "--no-progress", "--layers", "0", "-1",
                                 "--shard-mb", "0.002")) == 0
    return out, images, good, bad


def test_store_equals_the_shards(extracted):
    out, _, good, bad = extracted
    records, feats = read_output(out)  # load_file of whole shards: the independent reader
    store = dinofast.FeatureStore(out)
    with open(os.path.join(out, "index.jsonl")) as f:
        index_order = [json.loads(line)["path"] for line in f]
    assert list(store) == store.paths == [p for p in index_order if p in good]
    assert len(store) == len(good) and sorted(store.errors) == sorted(bad)
    assert all(store.errors[p] for p in bad)
    assert len({records[p]["shard"] for p in good}) > 1  # several shards were read
    for path in good:
        f = store[path]
        want = feats[path]
        for name in ("cls", "registers", "patches"):
            assert torch.equal(getattr(f, name), want[name])
            assert torch.equal(store.read(path, name), want[name])
        assert sorted(f.layers) == [0, 1]
        for i in (0, 1):
            for name in ("cls", "registers", "patches"):
                assert torch.equal(getattr(f.layers[i], name), want[f"layers.{i}.{name}"])
        assert f.patches.shape == (*records[path]["grid"], 32)
        assert store.record(path)["original_size"] == records[path]["original_size"]
    assert good[0] in store and bad[0] not in store and "nope.png" not in store
    with pytest.raises(KeyError, match="it failed"):
        store[bad[0]]
    with pytest.raises(KeyError, match="expected one of"):
        store.read(good[0], "layers.7.patches")
    assert isinstance(store, __import__("collections.abc").abc.Mapping)


def synthetic_output(out, n, *, D=64, grid=(4, 4), registers=4, ranks=2, merge=True, shard_mb=4.0):
    """n images' features written the way extract writes them (ShardWriter per rank, index parts,
    optionally merged), without a model. Returns {path: patches} for a few images to compare."""
    os.makedirs(out, exist_ok=True)
    writers = [extract.ShardWriter(out, r, int(shard_mb * 2**20)) for r in range(ranks)]
    g = torch.Generator().manual_seed(0)
    samples = {}
    for i in range(n):
        path = f"dir{i % 7}/img{i:05d}.jpg"
        key = extract.image_id(path)
        tensors = {f"{key}/cls": torch.randn(D, generator=g),
                   f"{key}/registers": torch.randn(registers, D, generator=g),
                   f"{key}/patches": torch.randn(*grid, D, generator=g)}
        if i % 997 == 0:
            samples[path] = tensors[f"{key}/patches"].clone()
        writers[i % ranks].add({"path": path, "status": "ok", "id": key, "keys": sorted(tensors),
                                "grid": list(grid), "size": [16 * grid[0], 16 * grid[1]],
                                "original_size": [64, 64]}, tensors)
    writers[0].record_error(extract._error_record("broken.jpg", "/x/broken.jpg", None, "OSError: broken"))
    for w in writers:
        w.flush()
    if merge:
        extract.merge_index(out)
    return samples


def rss_bytes() -> dict:
    """Resident memory: anonymous (tensors, Python objects) and total (also the mmapped shard
    pages that safe_open maps while a shard is open)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "VmRSS"):
                out[key] = int(line.split()[1]) * 1024
    if len(out) != 2:
        pytest.skip(reason="no RssAnon / VmRSS in /proc/self/status")
    return out


def test_memory_stays_flat_over_10000_images(tmp_path):
    out = str(tmp_path / "o")
    n = 10_000
    samples = synthetic_output(out, n)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    assert total > 50 * 2**20  # ~54 MiB of features in 14 shards
    store = dinofast.FeatureStore(out, max_open_shards=4)
    assert len(store) == n and list(store.errors) == ["broken.jpg"]
    for path, want in samples.items():
        assert torch.equal(store[path].patches, want)
    import gc

    gc.collect()
    before = rss_bytes()
    peak = dict(before)
    checksum = 0.0
    for i, path in enumerate(store):
        f = store[path]
        checksum += float(f.patches[0, 0, 0]) + float(f.cls[0])
        if i % 250 == 0:
            peak = {k: max(v, rss_bytes()[k]) for k, v in peak.items()}
    peak = {k: max(v, rss_bytes()[k]) for k, v in peak.items()}
    assert np.isfinite(checksum)
    grew = {k: (peak[k] - before[k]) / 2**20 for k in peak}
    # Measured here: the store grows ~2 MiB anonymous, ~20 MiB in all (4 open shards of 4 MiB
    # mapped); load_file of the shards it needs, kept, grows 15 MiB anonymous and 67 MiB in all.
    assert grew["RssAnon"] < 8 and grew["VmRSS"] < 4 * 4 + 8, f"RSS grew by {grew} MiB"


def test_multi_rank_and_unfinished_outputs(tmp_path):
    merged, parts = str(tmp_path / "merged"), str(tmp_path / "parts")
    a = synthetic_output(merged, 300, ranks=2, merge=True, shard_mb=0.05)
    b = synthetic_output(parts, 300, ranks=2, merge=False, shard_mb=0.05)
    assert not os.path.exists(os.path.join(parts, "index.jsonl"))
    sm, sp = dinofast.FeatureStore(merged), dinofast.FeatureStore(parts)
    shards = {sm.record(p)["shard"][:len("features-r000")] for p in sm}
    assert shards == {"features-r000", "features-r001"}
    assert len(sm) == len(sp) == 300 and sorted(sm.paths) == sorted(sp.paths)
    assert sm.paths == sorted(sm.paths, key=os.fsencode)  # index.jsonl is sorted by path
    for path in a:
        assert torch.equal(sm.read(path), a[path]) and torch.equal(sp.read(path), b[path])
    with pytest.raises(ValueError, match="out_dir"):
        dinofast.FeatureStore(str(tmp_path / "nothing"))


def _worker_pid(_):
    return os.getpid()


def test_dataset_with_dataloader_workers(tmp_path):
    out = str(tmp_path / "o")
    synthetic_output(out, 200, ranks=2, shard_mb=0.05)
    store = dinofast.FeatureStore(out)
    want = {p: store.read(p, "patches") for p in store}  # the parent holds open handles now
    parent_handles = dict(store._handles)
    assert parent_handles
    ds = store.dataset(names=("patches", "cls"))
    assert len(ds) == 200
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=lambda items: items)
    seen = []
    for batch in loader:
        for item in batch:
            assert torch.equal(item["patches"], want[item["path"]])
            assert item["cls"].shape == (64,)
            seen.append(item["path"])
    assert sorted(seen) == sorted(want) and len(seen) == len(set(seen))
    # the parent's handles were neither closed nor replaced by the workers
    assert all(store._handles.get(k) is v for k, v in parent_handles.items())
    # in a process other than the one that opened them, the handles are opened anew
    h = store._handle(next(iter(parent_handles)))
    store._pid = -1
    assert store._handle(next(iter(parent_handles))) is not h


def structured_image(seed, size):
    """A photo-like test image: a sky gradient, ground, a few filled shapes and some text."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    arr = (top * (1 - y) + bottom * y) * np.ones((1, w, 1))
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([0, int(h * 0.7), w, h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = [x0, y0, x0 + int(rng.integers(16, w // 2)), y0 + int(rng.integers(16, h // 2))]
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    d.text((8, 8), "dinofast", fill=(255, 255, 255))
    return im


@pytest.fixture(scope="module")
def photos(model_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("photos")
    sizes = [(160, 120), (96, 200), (224, 224)]
    for i, size in enumerate(sizes):
        structured_image(i, size).save(str(root / f"p{i}.png"))
    out = str(tmp_path_factory.mktemp("pfeats") / "o")
    assert extract.main(args_for(model_dir, str(root), out, "--no-progress", "--max-side", "128",
                                 "--layers", "-1")) == 0
    return str(root), out, dict(zip([f"p{i}.png" for i in range(len(sizes))], sizes))


def test_pca_image_is_the_photo_beside_its_map(photos):
    root, out, sizes = photos
    store = dinofast.FeatureStore(out)
    for path, (w, h) in sizes.items():
        im = store.pca_image(path, max_side=100)
        scale = min(1.0, 100 / max(w, h))
        pw, ph = round(w * scale), round(h * scale)
        gap = max(2, pw // 64)
        assert im.mode == "RGB" and im.size == (2 * pw + gap, ph)
        left = np.asarray(im)[:, :pw]
        photo = np.asarray(Image.open(os.path.join(root, path)).convert("RGB").resize((pw, ph),
                                                                                      Image.Resampling.BICUBIC))
        assert np.abs(left.astype(int) - photo.astype(int)).max() == 0
        right = np.asarray(im)[:, pw + gap:]
        assert right.std() > 10  # the map varies: not a blank panel
    # the map is PCA of this image's patches: its 3 channels are uncorrelated projections
    rgb = features.pca_rgb(store.read("p2.png")).reshape(-1, 3).double()
    c = torch.corrcoef(rgb.T)
    assert (c - torch.eye(3)).abs().max() < 0.5


def test_pca_command_writes_pictures_and_a_contact_sheet(photos, tmp_path, capsys):
    _, out, sizes = photos
    pics = str(tmp_path / "pics")
    assert dinofast.__main__.main(["pca", out, "--out", pics, "--limit", "2", "--max-side", "64"]) == 0
    files = sorted(os.listdir(pics))
    assert files == ["00000-p0.png", "00001-p1.png", "contact_sheet.png"]
    store = dinofast.FeatureStore(out)
    for name, path in zip(files[:2], store.paths[:2]):
        w, h = sizes[path]
        scale = min(1.0, 64 / max(w, h))
        pw, ph = round(w * scale), round(h * scale)
        assert Image.open(os.path.join(pics, name)).size == (2 * pw + max(2, pw // 64), ph)
    sheet = Image.open(os.path.join(pics, "contact_sheet.png"))
    assert sheet.size[1] == 160 + 16 and sheet.size[0] > 160
    # the last layer before the norm (stored with --layers -1) pictured with --layer -1
    assert dinofast.__main__.main(["pca", out, "--out", str(tmp_path / "l"), "--layer", "-1", "--limit", "1"]) == 0
    capsys.readouterr()
    assert dinofast.__main__.main(["pca", out, "--out", str(tmp_path / "m"), "--layer", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--layer: expected one of the stored layers [1], got 0" in err
    assert dinofast.__main__.main(["pca", str(tmp_path / "none"), "--out", str(tmp_path / "n")]) == 2
    assert not os.path.exists(str(tmp_path / "n"))
