"""`dinofast extract` end to end on generated images with a small random model saved to disk:
features against transformers run per image, the index, corrupt files, resume after an
interruption, settings checks, and 2 gloo ranks under torchrun matching 1 process."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dinofast
import dinofast.__main__
from dinofast import extract, models
from tests.conftest import MODEL_ATOL, TOL, assert_close

NUM_REGISTERS = 4
# features against transformers / another run: the whole-model fp32 bound, through assert_close
MODEL_TOL_SCALE = MODEL_ATOL / TOL[torch.float32]["atol"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_register_tokens=NUM_REGISTERS, patch_size=16, initializer_range=0.1, layerscale_value=0.5,
    )
    model = DINOv3ViTModel(config).eval()
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return str(path)


def write_images(root, seed=0):
    """Mixed sizes, modes and formats (one with EXIF rotation), in a nested folder, plus a file
    that is not an image and a truncated PNG. Returns (good relative paths, bad relative paths)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    good = []
    specs = [("a.png", 48, 80, "RGB"), ("b.jpg", 130, 33, "RGB"), ("sub/c.png", 200, 150, "RGBA"),
             ("sub/d.png", 10, 7, "L"), ("e.png", 64, 64, "RGB"), ("f.jpg", 90, 170, "L"),
             ("sub/g.png", 33, 120, "RGB")]
    for name, h, w, mode in specs:
        ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        a = rng.integers(0, 256, size=(h, w, ch) if ch > 1 else (h, w), dtype=np.uint8)
        Image.fromarray(a, mode=mode).save(os.path.join(root, name), quality=95)
        good.append(name)
    raw = Image.fromarray(rng.integers(0, 256, size=(40, 72, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(os.path.join(root, "rotated.png"), exif=exif.tobytes())
    good.append("rotated.png")
    with open(os.path.join(root, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8 definitely not a jpeg" * 5)
    buf = open(os.path.join(root, "a.png"), "rb").read()
    with open(os.path.join(root, "sub/truncated.png"), "wb") as f:
        f.write(buf[: len(buf) // 2])
    with open(os.path.join(root, "notes.txt"), "w") as f:  # not an image extension: not listed
        f.write("ignore me")
    return sorted(good), sorted(["broken.jpg", "sub/truncated.png"])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good, bad = write_images(str(root))
    return str(root), good, bad


def reference_features(model_dir, image_dir, names, max_side):
    """transformers' own model (unpatched), one image at a time."""
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(model_dir).eval()
    proc = dinofast.ImageProcessor(patch_size=16, max_side=max_side)
    out = {}
    for name in names:
        with Image.open(os.path.join(image_dir, name)) as im:
            pixels, grid = proc(im)
        with torch.no_grad():
            o = model(pixel_values=pixels[None], output_hidden_states=True)
        h, last = o.last_hidden_state[0], o.hidden_states[-1][0]
        out[name] = dict(cls=h[0], registers=h[1:1 + NUM_REGISTERS],
                         patches=h[1 + NUM_REGISTERS:].unflatten(0, (grid.Hp, grid.Wp)), grid=grid,
                         last_layer_patches=last[1 + NUM_REGISTERS:].unflatten(0, (grid.Hp, grid.Wp)))
    return out


def read_output(out_dir):
    """{path: record}, {path: {name: tensor}} from index.jsonl and the shards it names."""
    with open(os.path.join(out_dir, "index.jsonl")) as f:
        records = [json.loads(line) for line in f]
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)), "an image recorded twice"
    shards = {}
    feats = {}
    for r in records:
        if r["status"] != "ok":
            continue
        if r["shard"] not in shards:
            shards[r["shard"]] = load_file(os.path.join(out_dir, r["shard"]))
        feats[r["path"]] = {k.split("/", 1)[1]: shards[r["shard"]][k] for k in r["keys"]}
    # every tensor in every shard belongs to exactly one record
    assert sum(len(s) for s in shards.values()) == sum(len(v) for v in feats.values())
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp") or f.startswith("index.r")]
    return {r["path"]: r for r in records}, feats


def args_for(model_dir, images, out, *extra):
    return ["--model", model_dir, "--images", images, "--out", out, "--max-side", "96",
            "--max-tokens-per-batch", "100", "--workers", "2", *extra]


def test_extract_end_to_end(model_dir, image_dir, tmp_path, capsys):
    images, good, bad = image_dir
    out = str(tmp_path / "feats")
    assert dinofast.__main__.main(["extract", *args_for(model_dir, images, out, "--layers", "-1", "0")]) == 0
    captured = capsys.readouterr()
    assert "images/s" in captured.err  # the tqdm bar
    assert f"{len(good)} images in" in captured.out and f"{len(bad)} error(s)" in captured.out
    records, feats = read_output(out)
    assert sorted(records) == sorted(good + bad)
    for name in bad:
        assert records[name]["status"] == "error" and records[name]["error"]
    ref = reference_features(model_dir, images, good, max_side=96)
    for name in good:
        r, f, e = records[name], feats[name], ref[name]
        assert r["status"] == "ok"
        assert r["grid"] == [e["grid"].Hp, e["grid"].Wp]
        assert r["size"] == [16 * e["grid"].Hp, 16 * e["grid"].Wp]
        # -1 is the last layer before the final norm (layer 1 of 2), as in encode_packed; the final
        # normed output is always there as cls / registers / patches
        assert sorted(f) == ["cls", "layers.0.cls", "layers.0.patches", "layers.0.registers",
                             "layers.1.cls", "layers.1.patches", "layers.1.registers", "patches", "registers"]
        for key in ("cls", "registers", "patches"):
            assert f[key].shape == e[key].shape and f[key].dtype == torch.float32
            assert_close(f[key], e[key], scale=MODEL_TOL_SCALE)
        assert f["layers.0.patches"].shape == e["patches"].shape
        assert_close(f["layers.1.patches"], e["last_layer_patches"], scale=MODEL_TOL_SCALE)
    assert records["rotated.png"]["original_size"] == [72, 40]  # EXIF orientation 6 turns it upright
    assert records["b.jpg"]["original_size"] == [130, 33]
    # several shards were not needed here, but the batches were token-budgeted: 100 tokens max
    assert len(set(r["shard"] for r in records.values() if r["status"] == "ok")) >= 1


def test_glob_and_bfloat16(model_dir, image_dir, tmp_path):
    images, good, _ = image_dir
    out = str(tmp_path / "feats")
    pattern = os.path.join(images, "sub", "*.png")
    extract.main(args_for(model_dir, pattern, out, "--dtype", "bfloat16", "--no-progress"))
    records, feats = read_output(out)
    assert sorted(records) == sorted(os.path.join(images, "sub", n)
                                     for n in ("c.png", "d.png", "g.png", "truncated.png"))
    ref = reference_features(model_dir, images, ["sub/c.png"], max_side=96)["sub/c.png"]
    got = feats[os.path.join(images, "sub", "c.png")]
    assert got["patches"].dtype == torch.bfloat16
    # bf16 weights and activations through 2 layers: a few bf16 ulps of the fp32 features
    assert (got["patches"].float() - ref["patches"]).abs().max() < 0.1


class Interrupt(Exception):
    pass


def test_resume_after_interruption(model_dir, image_dir, tmp_path, monkeypatch):
    images, good, bad = image_dir
    out = str(tmp_path / "feats")
    argv = args_for(model_dir, images, out, "--shard-mb", "0.00001", "--no-progress")  # a shard per image

    real_save = extract.save_shard
    calls = []

    def crashing_save(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # die half way through writing the third shard
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)
            raise Interrupt("killed")
        real_save(tensors, path)

    monkeypatch.setattr(extract, "save_shard", crashing_save)
    with pytest.raises(Interrupt):
        extract.main(argv)
    left = sorted(os.listdir(out))
    assert [f for f in left if f.endswith(".tmp")], left
    assert "index.jsonl" not in left  # the merge never ran
    assert len([f for f in left if f.endswith(".safetensors")]) == 2
    # a shard renamed but never indexed (a crash between the two) must not count either
    stray = os.path.join(out, "features-r000-00099.safetensors")
    real_save({"x/cls": torch.ones(3)}, stray)

    monkeypatch.setattr(extract, "save_shard", real_save)
    encoded = []
    real_encode = models.encode_packed

    def counting_encode(model, images, output_layers=None):
        encoded.extend(im.shape for im in images)
        return real_encode(model, images, output_layers=output_layers)

    monkeypatch.setattr(models, "encode_packed", counting_encode)
    extract.main(argv)
    records, feats = read_output(out)
    assert not os.path.exists(stray)
    assert sorted(records) == sorted(good + bad)
    # the two images whose shards were complete were not encoded again (errors were recorded
    # as they happened, before the crash, and are not retried either)
    assert len(encoded) == len(good) - 2
    ref = reference_features(model_dir, images, good, max_side=96)
    for name in good:
        for key in ("cls", "registers", "patches"):
            assert_close(feats[name][key], ref[name][key], scale=MODEL_TOL_SCALE)

    # a third run has nothing to do and leaves the output as it was
    before = open(os.path.join(out, "index.jsonl")).read()
    encoded.clear()
    extract.main(argv)
    assert encoded == [] and open(os.path.join(out, "index.jsonl")).read() == before


def refused(capsys, argv, rc=2) -> str:
    """extract.main(argv) must stop with exit status rc and exactly one line on stderr; returns it."""
    capsys.readouterr()
    try:
        got = extract.main(argv)
    except SystemExit as e:  # argparse's own refusals
        got = e.code
    err = capsys.readouterr().err
    assert got == rc, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_other_settings_refuse_to_mix(model_dir, image_dir, tmp_path, capsys):
    images, _, _ = image_dir
    out = str(tmp_path / "feats")
    extract.main(args_for(model_dir, os.path.join(images, "e.png"), out, "--no-progress"))
    msg = refused(capsys, ["--model", model_dir, "--images", images, "--out", out, "--max-side", "64", "--no-progress"])
    assert "'max_side': (96, 64)" in msg


def test_bad_arguments(model_dir, image_dir, tmp_path, capsys):
    images, _, _ = image_dir
    out = str(tmp_path / "o")
    msg = refused(capsys, args_for(model_dir, images, out, "--layers", "-1", "5", "--no-progress"))
    assert r"--layers: expected layer indices in [-2, 1] (2 layers), got [5]" in msg
    for opt in ("--max-side", "--max-tokens-per-batch", "--workers", "--shard-mb"):
        msg = refused(capsys, args_for(model_dir, images, out, opt, "0"))
        assert f"{opt}: expected a positive number, got 0" in msg
    cases = {
        ("--model", str(tmp_path / "nodir")): "--model",
        ("--max-side", "8"): "--max-side: expected at least the patch size 16, got 8",
        ("--shard-mb", "nan"): "--shard-mb: expected a finite positive number, got 'nan'",
        ("--out", "/dev/null"): "--out /dev/null: expected a directory",
        ("--device", "tpu"): "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'",
        ("--images", str(tmp_path / "typo")): "--images",
        ("--workers", "two"): "--workers: expected a positive integer, got 'two'",
    }
    if not torch.cuda.is_available():
        cases[("--device", "cuda")] = "--device cuda: CUDA is not available here"
    for (opt, value), want in cases.items():
        argv = args_for(model_dir, images, out, "--no-progress")
        if opt in argv:
            argv[argv.index(opt) + 1] = value
        else:
            argv += [opt, value]
        msg = refused(capsys, argv)
        assert want in msg, (opt, value, msg)
    refused(capsys, ["--images", images, "--out", out])  # no --model
    assert not os.path.exists(out), "something was written before the arguments were validated"


def test_typo_writes_nothing_and_the_corrected_command_runs(model_dir, image_dir, tmp_path, capsys):
    images, good, bad = image_dir
    out = str(tmp_path / "o")
    msg = refused(capsys, args_for(model_dir, images + "-typo", out, "--no-progress"))
    assert "--images" in msg and "typo" in msg
    assert not os.path.exists(out)
    # the corrected command, with other settings than the failed one, is not refused
    assert extract.main(args_for(model_dir, images, out, "--no-progress", "--max-side", "64")) == 0
    assert sorted(read_output(out)[0]) == sorted(good + bad)


def test_empty_image_set_is_an_error(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = str(tmp_path / "o")
    assert "holds no image files" in refused(capsys, args_for(model_dir, str(empty), out, "--no-progress"))
    assert "glob matches no files" in refused(capsys, args_for(model_dir, str(empty / "*.png"), out))
    assert not os.path.exists(out)


def test_missing_images_is_a_clear_error(model_dir, tmp_path, capsys):
    msg = refused(capsys, ["--model", model_dir, "--images", str(tmp_path / "nothing*.png"),
                           "--out", str(tmp_path / "o"), "--no-progress"])
    assert "glob matches no files" in msg


# ---- model identity --------------------------------------------------------------------------------

def save_random_model(path, seed):
    from tests.dinov3_models import random_model

    model = random_model(seed=seed, hidden=128, heads=2, layers=2).cpu()
    model.save_pretrained(path)
    return model


def test_other_weights_at_the_same_path_are_refused(image_dir, tmp_path, capsys):
    images, _, _ = image_dir
    model_path, out = str(tmp_path / "model"), str(tmp_path / "o")
    save_random_model(model_path, seed=1)
    argv = args_for(model_path, os.path.join(images, "e.png"), out, "--no-progress")
    assert extract.main(argv) == 0
    with open(os.path.join(out, "extract_config.json")) as f:
        stored = json.load(f)["model_fingerprint"]
    import shutil

    shutil.rmtree(model_path)
    save_random_model(model_path, seed=2)  # other weights, same path, same architecture
    msg = refused(capsys, args_for(model_path, os.path.join(images, "a.png"), out, "--no-progress"))
    now = extract.model_fingerprint(extract.load_model(model_path, torch.float32, torch.device("cpu")))
    assert now != stored and stored in msg and now in msg and "another model" in msg
    assert sorted(read_output(out)[0]) == [os.path.join(images, "e.png")]


def test_same_weights_from_another_path_or_layout_are_accepted(image_dir, tmp_path, capsys):
    from tests.dinov3_models import random_model
    from tests.test_checkpoint import save, to_original_layout

    images, good, bad = image_dir
    source = random_model(seed=3, hidden=128, heads=2, layers=2).cpu()
    pth = str(save(to_original_layout(source), tmp_path / "dinov3.pth"))
    converted = str(tmp_path / "converted")
    assert dinofast.__main__.main(["convert", pth, converted]) == 0
    out = str(tmp_path / "o")
    assert extract.main(args_for(pth, os.path.join(images, "e.png"), out, "--no-progress")) == 0
    capsys.readouterr()
    # the converted directory at another path: the same model, so the output grows
    assert extract.main(args_for(converted, images, out, "--no-progress")) == 0
    assert "1 already done" in capsys.readouterr().out
    records, _ = read_output(out)
    assert len(records) == len(good) + len(bad) + 1  # e.png by glob path and by directory path


# ---- hostile folders ---------------------------------------------------------------------------------

def test_file_name_that_is_not_utf8(model_dir, image_dir, tmp_path, capsys):
    images, _, _ = image_dir
    root = tmp_path / "imgs"
    root.mkdir()
    raw = os.path.join(os.fsencode(str(root)), b"bad\xffname.png")
    with open(os.path.join(images, "a.png"), "rb") as src, open(raw, "wb") as dst:
        dst.write(src.read())
    Image.open(os.path.join(images, "e.png")).save(str(root / "good.png"))
    out = str(tmp_path / "o")
    assert extract.main(args_for(model_dir, str(root), out, "--no-progress")) == 0
    records, feats = read_output(out)
    assert len(records) == 2 and all(r["status"] == "ok" for r in records.values())
    name = next(p for p in records if p != "good.png")
    assert os.fsencode(name) == b"bad\xffname.png"  # lossless
    assert records[name]["id"] == extract.image_id(name)
    ref = reference_features(model_dir, images, ["a.png"], max_side=96)["a.png"]
    assert_close(feats[name]["patches"], ref["patches"], scale=MODEL_TOL_SCALE)
    # and a resume reads it back as done
    capsys.readouterr()
    assert extract.main(args_for(model_dir, str(root), out, "--no-progress")) == 0
    assert "0 images in" in capsys.readouterr().out


def make_loops(root):
    """root/real/{x,y}.png, root/real/loop -> root/real, root/real/sub/back -> root, and
    root/alias.png -> real/x.png: every file reachable many (or infinitely many) ways."""
    real = root / "real"
    (real / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("x.png", "y.png"):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(str(real / name))
    os.symlink(str(real), str(real / "loop"))
    os.symlink(str(root), str(real / "sub" / "back"))
    os.symlink(str(real / "x.png"), str(root / "alias.png"))


@pytest.mark.parametrize("how", ["directory", "glob"])
def test_symlink_loops_list_each_file_once(model_dir, tmp_path, how):
    root = tmp_path / "imgs"
    root.mkdir()
    make_loops(root)
    found = extract.list_images(str(root) if how == "directory" else str(root / "**" / "*.png"))
    files = [f for _, f in found]
    assert sorted(files) == sorted({str(root / "real" / "x.png"), str(root / "real" / "y.png")})
    assert len(files) == len(set(files)) == 2
    out = str(tmp_path / "o")
    spec = str(root) if how == "directory" else str(root / "**" / "*.png")
    assert extract.main(args_for(model_dir, spec, out, "--no-progress")) == 0
    records, _ = read_output(out)
    assert len(records) == 2


def test_torn_index_line_is_repaired_on_resume(model_dir, image_dir, tmp_path, monkeypatch):
    images, good, bad = image_dir
    out = str(tmp_path / "o")
    argv = args_for(model_dir, images, out, "--shard-mb", "0.00001", "--no-progress")  # a shard per image
    calls = []
    real_save = extract.save_shard

    def crashing_save(tensors, path):
        calls.append(path)
        if len(calls) == 4:
            raise Interrupt("killed")
        real_save(tensors, path)

    monkeypatch.setattr(extract, "save_shard", crashing_save)
    with pytest.raises(Interrupt):
        extract.main(argv)
    part = os.path.join(out, "index.r000.jsonl")
    with open(part, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    # a kill -9 in the middle of the last append: half of its line stays
    with open(part, "wb") as f:
        f.write(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    monkeypatch.setattr(extract, "save_shard", real_save)
    assert extract.main(argv) == 0
    records, _ = read_output(out)  # also: every tensor of every shard belongs to a record
    assert sorted(records) == sorted(good + bad)
    assert all(records[n]["status"] == "ok" for n in good)


def test_disk_full_during_the_index_append(model_dir, image_dir, tmp_path, monkeypatch, capsys):
    images, good, bad = image_dir
    out = str(tmp_path / "o")
    argv = args_for(model_dir, images, out, "--shard-mb", "0.00001", "--no-progress")
    real_write = extract._write
    appended = []

    def full_disk(fd, data):
        appended.append(data)
        if len(appended) == 5:  # half the line reaches the disk, then ENOSPC
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(extract, "_write", full_disk)
    msg = refused(capsys, argv, rc=1)
    assert "no space left on the device" in msg and "run the same command again" in msg
    part = os.path.join(out, "index.r000.jsonl")
    with open(part, "rb") as f:
        assert f.read().endswith(b"\n"), "a half line was left for the next append to run into"
    monkeypatch.setattr(extract, "_write", real_write)
    assert extract.main(argv) == 0
    records, _ = read_output(out)
    assert sorted(records) == sorted(good + bad)
    assert all(records[n]["status"] == "ok" for n in good)


def test_retry_errors(model_dir, image_dir, tmp_path, capsys):
    images, _, _ = image_dir
    root = tmp_path / "imgs"
    root.mkdir()
    with open(root / "later.png", "wb") as f:
        f.write(b"not yet a png")
    Image.open(os.path.join(images, "e.png")).save(str(root / "fine.png"))
    out = str(tmp_path / "o")
    assert extract.main(args_for(model_dir, str(root), out, "--no-progress")) == 0
    assert read_output(out)[0]["later.png"]["status"] == "error"
    Image.open(os.path.join(images, "a.png")).save(str(root / "later.png"))  # fixed
    assert extract.main(args_for(model_dir, str(root), out, "--no-progress")) == 0
    assert read_output(out)[0]["later.png"]["status"] == "error"  # not retried without the flag
    capsys.readouterr()
    assert extract.main(args_for(model_dir, str(root), out, "--no-progress", "--retry-errors")) == 0
    assert "1 images in" in capsys.readouterr().out
    records, feats = read_output(out)
    assert records["later.png"]["status"] == "ok" and feats["later.png"]["patches"].shape[-1] == 32


def test_files_honour_the_umask(model_dir, image_dir, tmp_path):
    images, _, _ = image_dir
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        out = str(tmp_path / f"o{umask:o}")
        old = os.umask(umask)
        try:
            assert extract.main(args_for(model_dir, images, out, "--no-progress")) == 0
        finally:
            os.umask(old)
        modes = {f: os.stat(os.path.join(out, f)).st_mode & 0o777 for f in os.listdir(out)}
        assert set(modes.values()) == {mode}, modes


def snapshot(path):
    return {f: (os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns)
            for f in sorted(os.listdir(path))}


def test_check_verifies_a_read_only_output(model_dir, image_dir, tmp_path, monkeypatch, capsys):
    import builtins

    images, good, bad = image_dir
    out = str(tmp_path / "o")
    assert extract.main(args_for(model_dir, images, out, "--no-progress")) == 0
    before = snapshot(out)
    os.chmod(out, 0o555)
    try:
        # read-only for root too: every way of writing raises
        real_open = builtins.open

        def read_only_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+"):
                raise PermissionError(13, "read-only file system", file)
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr(builtins, "open", read_only_open)
        for name in ("makedirs", "replace", "remove", "rename", "truncate", "chmod"):
            monkeypatch.setattr(os, name, lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "read-only")))
        capsys.readouterr()
        assert extract.main(["--check", "--out", out, "--model", model_dir, "--images", images]) == 0
        text = capsys.readouterr().out
        assert f"{len(good) + len(bad)} records ({len(good)} ok, {len(bad)} error)" in text and ": OK" in text
        monkeypatch.undo()
    finally:
        os.chmod(out, 0o755)
    assert snapshot(out) == before
    # --check fails where something is wrong: another model, an image not extracted, a lost shard
    other = str(tmp_path / "other")
    save_random_model(other, seed=5)
    assert extract.main(["--check", "--out", out, "--model", other]) == 1
    assert "fingerprint" in capsys.readouterr().out
    extra = tmp_path / "more"
    extra.mkdir()
    Image.open(os.path.join(images, "a.png")).save(str(extra / "new.png"))
    assert extract.main(["--check", "--out", out, "--images", str(extra)]) == 1
    assert "1 image(s) of --images are not in the index" in capsys.readouterr().out
    shard = next(f for f in os.listdir(out) if f.endswith(".safetensors"))
    os.remove(os.path.join(out, shard))
    assert extract.main(["--check", "--out", out]) == 1


def run_cli(args, env_extra=None, timeout=300):
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_two_gloo_ranks_match_one_process(model_dir, image_dir, tmp_path):
    images, good, bad = image_dir
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--max-side", "96", "--max-tokens-per-batch", "100", "--workers", "1", "--no-progress", "--device", "cpu"]
    r1 = run_cli(["-m", "dinofast", "extract", "--model", model_dir, "--images", images, "--out", one, *common])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dinofast",
                  "extract", "--model", model_dir, "--images", images, "--out", two, *common],
                 env_extra={"OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "on 2 process(es)" in r2.stdout
    rec1, f1 = read_output(one)
    rec2, f2 = read_output(two)
    assert sorted(rec1) == sorted(rec2) == sorted(good + bad)
    shards = {r["shard"] for r in rec2.values() if r["status"] == "ok"}
    assert any(s.startswith("features-r000-") for s in shards) and any(s.startswith("features-r001-") for s in shards)
    for name in good:
        assert rec1[name]["grid"] == rec2[name]["grid"]
        for key in ("cls", "registers", "patches"):
            assert_close(f2[name][key], f1[name][key], scale=MODEL_TOL_SCALE)
    for name in bad:
        assert rec2[name]["status"] == "error"
    # the reader sees the two ranks' shards as one store, equal to what load_file reads
    store = dinofast.FeatureStore(two)
    assert sorted(store) == sorted(good) and sorted(store.errors) == sorted(bad)
    for name in good:
        assert torch.equal(store[name].patches, f2[name]["patches"])
    # rank 0 refusing (other settings) stops every rank with its reason instead of leaving rank 1
    # waiting for a work list
    r3 = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dinofast",
                  "extract", "--model", model_dir, "--images", images, "--out", two, *common[2:], "--max-side", "64"],
                 env_extra={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert r3.returncode != 0 and "other settings" in r3.stderr


def test_extract_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        dinofast.__main__.main(["extract", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--images", "--out", "--max-side", "--max-tokens-per-batch", "--layers", "--dtype",
                "--device"):
        assert opt in text


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv, world_size=2, timeout=240):
    """Start the ranks as torchrun would (RANK / WORLD_SIZE / MASTER_* in the environment, gloo on
    CPU); returns one CompletedProcess per rank."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-m", "dinofast", "extract", *argv], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("bad", ["images typo (rank 0 decides)", "argument (every rank parses)"])
def test_refusal_under_two_gloo_ranks(model_dir, image_dir, tmp_path, bad):
    images, _, _ = image_dir
    out = str(tmp_path / "o")
    argv = args_for(model_dir, images + "-typo", out, "--no-progress", "--device", "cpu")
    if bad.startswith("argument"):
        argv = args_for(model_dir, images, out, "--no-progress", "--shard-mb", "nan")
    ranks = run_ranks(argv)
    for r in ranks:
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
    said = [line for r in ranks for line in r.stderr.splitlines() if "error:" in line]
    assert len(said) == 1 and len([line for line in ranks[0].stderr.splitlines() if line.strip()]) == 1, said
    assert ("typo" in said[0]) if bad.startswith("images") else ("--shard-mb" in said[0])
    assert not os.path.exists(out)
