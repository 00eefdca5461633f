"""`dinofast extract` end to end on generated images with a small random model saved to disk:
features against transformers run per image, the index, corrupt files, resume after an
interruption, settings checks, and 2 gloo ranks under torchrun matching 1 process."""
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
    assert sorted(records) == sorted(os.path.join(images, "sub", n) for n in ("c.png", "d.png", "g.png", "truncated.png"))
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


def test_other_settings_refuse_to_mix(model_dir, image_dir, tmp_path):
    images, _, _ = image_dir
    out = str(tmp_path / "feats")
    extract.main(args_for(model_dir, os.path.join(images, "e.png"), out, "--no-progress"))
    with pytest.raises(SystemExit, match="max_side"):
        extract.main(["--model", model_dir, "--images", images, "--out", out, "--max-side", "64", "--no-progress"])


def test_bad_arguments(model_dir, image_dir, tmp_path, capsys):
    images, _, _ = image_dir
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit, match=r"--layers: .*\[-2, 1\] \(2 layers\), got \[5\]"):
        extract.main(args_for(model_dir, images, out, "--layers", "-1", "5", "--no-progress"))
    for opt in ("--max-side", "--max-tokens-per-batch", "--workers", "--shard-mb"):
        with pytest.raises(SystemExit) as e:
            extract.main(args_for(model_dir, images, out, opt, "0"))
        assert e.value.code == 2 and f"{opt}: expected a positive number, got 0" in capsys.readouterr().err
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]


def test_image_over_the_budget_is_encoded_alone_with_a_warning(model_dir, image_dir, tmp_path):
    images, _, _ = image_dir
    out = str(tmp_path / "o")
    with pytest.warns(RuntimeWarning, match=r"1 image\(s\) exceed --max-tokens-per-batch=10"):
        extract.main(["--model", model_dir, "--images", os.path.join(images, "e.png"), "--out", out,
                      "--max-tokens-per-batch", "10", "--no-progress"])
    records, feats = read_output(out)
    path = os.path.join(images, "e.png")
    assert records[path]["status"] == "ok" and feats[path]["patches"].shape == (4, 4, 32)


def test_missing_images_is_a_clear_error(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="neither a directory nor a glob"):
        extract.main(["--model", model_dir, "--images", str(tmp_path / "nothing*.png"), "--out", str(tmp_path / "o"),
                      "--no-progress"])


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
    for opt in ("--model", "--images", "--out", "--max-side", "--max-tokens-per-batch", "--layers", "--dtype", "--device"):
        assert opt in text
