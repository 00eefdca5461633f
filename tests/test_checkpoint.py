"""load_dinov3 / convert: round trips through both layouts, and every promised error or repair."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import dinofast
from dinofast.models.checkpoint import PERIODS_CONFIG_KEY
from dinofast.models.dinov3 import is_patched
from tests.conftest import MODEL_ATOL
from tests.dinov3_models import images, max_diff, random_model


def default_periods(model):
    """theta^(4k/D) in fp32: 1/periods is then transformers' inv_freq bit for bit."""
    D = model.config.hidden_size // model.config.num_attention_heads
    return model.config.rope_theta ** torch.arange(0, 1, 4 / D, dtype=torch.float32)


def to_original_layout(model, periods="default", *, bias_mask=True):
    """The test's own writer of the original DINOv3 layout, following the mapping documented in
    dinofast/models/checkpoint.py: fused qkv rows [q | k | v] with a bias_mask, ls*.gamma,
    storage_tokens, mask_token [1, C], rope_embed.periods, fc1/fc2 or w1/w2/w3."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    C = model.config.hidden_size
    if isinstance(periods, str):
        periods = default_periods(model)
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, C),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
    }
    if model.config.num_register_tokens:
        out["storage_tokens"] = sd["embeddings.register_tokens"]
    if periods is not None:
        out["rope_embed.periods"] = periods
    mlp = (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")) if model.config.use_gated_mlp else \
        (("fc1", "up_proj"), ("fc2", "down_proj"))
    for i in range(model.config.num_hidden_layers):
        s, d = f"blocks.{i}", f"model.layer.{i}"
        a = f"{d}.attention"
        for n in ("norm1", "norm2"):
            out[f"{s}.{n}.weight"], out[f"{s}.{n}.bias"] = sd[f"{d}.{n}.weight"], sd[f"{d}.{n}.bias"]
        out[f"{s}.attn.qkv.weight"] = torch.cat([sd[f"{a}.{p}_proj.weight"] for p in "qkv"])
        # a K bias that is not zero but masked: the loader must apply the mask
        out[f"{s}.attn.qkv.bias"] = torch.cat([sd[f"{a}.q_proj.bias"], torch.randn(C), sd[f"{a}.v_proj.bias"]])
        if bias_mask:
            out[f"{s}.attn.qkv.bias_mask"] = torch.cat([torch.ones(C), torch.zeros(C), torch.ones(C)])
        out[f"{s}.attn.proj.weight"], out[f"{s}.attn.proj.bias"] = sd[f"{a}.o_proj.weight"], sd[f"{a}.o_proj.bias"]
        out[f"{s}.ls1.gamma"] = sd[f"{d}.layer_scale1.lambda1"]
        out[f"{s}.ls2.gamma"] = sd[f"{d}.layer_scale2.lambda1"]
        for src, dst in mlp:
            out[f"{s}.mlp.{src}.weight"] = sd[f"{d}.mlp.{dst}.weight"]
            out[f"{s}.mlp.{src}.bias"] = sd[f"{d}.mlp.{dst}.bias"]
    return out


def save(sd, path):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return path


def assert_same_model(loaded, source, *, sizes=((64, 48), (64, 48))):
    """Same weights bit for bit, patched, and the same outputs as the (unpatched) source."""
    assert is_patched(loaded) and not loaded.training
    ref_sd, got_sd = source.state_dict(), loaded.state_dict()
    assert got_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        assert torch.equal(got_sd[k], ref_sd[k]), k
    assert torch.equal(loaded.rope_embeddings.inv_freq, source.rope_embeddings.inv_freq)
    x = torch.stack(images(list(sizes), seed=3))
    with torch.no_grad():
        a, b = loaded(x), source(x)
    assert max_diff(a.last_hidden_state, b.last_hidden_state) <= MODEL_ATOL
    assert max_diff(a.pooler_output, b.pooler_output) <= MODEL_ATOL


@pytest.fixture(params=[False, True], ids=["gelu", "swiglu"])
def source(request):
    return random_model(gated=request.param, registers=4, hidden=128, heads=2, layers=2)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
def test_transformers_directory_round_trip(source, tmp_path):
    source.save_pretrained(tmp_path / "hf")
    assert_same_model(dinofast.load_dinov3(tmp_path / "hf"), source)


def test_backbone_directory_loads_as_model(tmp_path):
    backbone = random_model(backbone=True)
    backbone.save_pretrained(tmp_path / "bb")
    model = dinofast.load_dinov3(tmp_path / "bb")
    for k, v in backbone.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_original_layout_round_trip(source, tmp_path, ext):
    path = save(to_original_layout(source), tmp_path / f"ckpt.{ext}")
    assert_same_model(dinofast.load_dinov3(path), source)


def test_original_layout_without_registers_or_bias_mask(tmp_path):
    source = random_model(registers=0)
    sd = to_original_layout(source, bias_mask=False)
    C = source.config.hidden_size
    for i in range(2):  # without a mask the K bias must be stored as zeros
        sd[f"blocks.{i}.attn.qkv.bias"][C:2 * C] = 0
    assert_same_model(dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors")), source)


def test_heads_from_the_variants_table(tmp_path):
    """Without rope_embed.periods the head count comes from the variants table (ViT-S: 384 -> 6)."""
    source = random_model(hidden=384, heads=6, layers=1)
    loaded = dinofast.load_dinov3(save(to_original_layout(source, None), tmp_path / "s.safetensors"))
    assert loaded.config.num_attention_heads == 6
    assert_same_model(loaded, source)
    small = random_model(hidden=64, layers=1)
    with pytest.raises(dinofast.CheckpointError, match="cannot tell the number of heads"):
        dinofast.load_dinov3(save(to_original_layout(small, None), tmp_path / "x.safetensors"))


def test_stored_periods_are_honoured(tmp_path):
    source = random_model()
    default = source.rope_embeddings.inv_freq.clone()
    periods = (1 / default).to(torch.bfloat16).float()  # the release stores bf16-rounded periods
    assert not torch.equal(1 / periods, default)
    path = save(to_original_layout(source, periods), tmp_path / "c.pth")
    loaded = dinofast.load_dinov3(path)
    assert torch.equal(loaded.rope_embeddings.inv_freq, 1 / periods)
    assert loaded.config.dinofast_rope_periods == periods.tolist()
    source.rope_embeddings.inv_freq = 1 / periods
    assert_same_model(loaded, source, sizes=[(64, 96)] * 2)
    ignored = dinofast.load_dinov3(path, use_stored_periods=False)
    assert torch.equal(ignored.rope_embeddings.inv_freq, default)
    assert not hasattr(ignored.config, PERIODS_CONFIG_KEY)


def test_dtype_and_device(tmp_path):
    source = random_model()
    path = save(to_original_layout(source), tmp_path / "c.safetensors")
    model = dinofast.load_dinov3(path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_embeddings.inv_freq.dtype == torch.float32
    assert torch.equal(model.norm.weight, source.norm.weight.to(torch.bfloat16))
    assert dinofast.load_dinov3(path).norm.weight.dtype == torch.float32  # default: the file's dtype


def test_convert_command(tmp_path):
    source = random_model(gated=True)
    periods = (1 / source.rope_embeddings.inv_freq).to(torch.bfloat16).float()
    src = save(to_original_layout(source, periods), tmp_path / "orig.pth")
    dst = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "dinofast", "convert", str(src), str(dst)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 layers" in proc.stdout and "SwiGLU" in proc.stdout
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    from_dir, from_file = dinofast.load_dinov3(dst), dinofast.load_dinov3(src)
    for k, v in from_file.state_dict().items():
        assert torch.equal(from_dir.state_dict()[k], v), k
    assert torch.equal(from_dir.rope_embeddings.inv_freq, 1 / periods)
    from transformers import DINOv3ViTModel  # transformers itself reads the directory

    plain = DINOv3ViTModel.from_pretrained(dst)
    for k, v in from_file.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    # a second run refuses to overwrite
    again = subprocess.run([sys.executable, "-m", "dinofast", "convert", str(src), str(dst)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "dst: expected a new or empty directory" in again.stderr


# ---------------------------------------------------------------------------------------------
# errors and repairs
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def original(tmp_path):
    source = random_model()
    return source, to_original_layout(source)


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_truncated_file(original, tmp_path, ext):
    path = save(original[1], tmp_path / f"c.{ext}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(dinofast.CheckpointError, match="could not read the file"):
        dinofast.load_dinov3(path)


def test_missing_key(original, tmp_path):
    sd = original[1]
    del sd["blocks.1.ls2.gamma"]
    with pytest.raises(dinofast.CheckpointError, match=r"missing keys \(1\): \['blocks.1.ls2.gamma'\]"):
        dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors"))


def test_extra_key(original, tmp_path):
    sd = original[1]
    sd["blocks.0.attn.extra"] = torch.ones(3)
    with pytest.raises(dinofast.CheckpointError, match=r"unexpected keys \(1\): \['blocks.0.attn.extra'\]"):
        dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors"))


def test_wrong_shape(original, tmp_path):
    sd = original[1]
    sd["blocks.1.mlp.fc2.weight"] = sd["blocks.1.mlp.fc2.weight"][:, :-1].clone()
    with pytest.raises(dinofast.CheckpointError,
                       match=r"blocks.1.mlp.fc2.weight: expected shape \[128, 256\], got \[128, 255\]"):
        dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors"))
    sd = original[1]
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:-2]
    with pytest.raises(dinofast.CheckpointError, match=r"blocks.0.attn.qkv.weight: expected shape \[384, 128\]"):
        dinofast.load_dinov3(save(sd, tmp_path / "c2.safetensors"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weight(original, tmp_path, value):
    sd = original[1]
    sd["blocks.1.mlp.fc1.weight"][3, 5] = value
    with pytest.raises(dinofast.CheckpointError, match=r"NaN or Inf in \['blocks.1.mlp.fc1.weight'\]"):
        dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors"))


def test_nan_bias_mask_is_repaired(original, tmp_path):
    source, sd = original
    for i in range(2):  # as in a model that was built and never loaded
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.full((3 * 128,), float("nan"))
    with pytest.warns(RuntimeWarning, match=r"bias_mask holds NaN.*repaired"):
        loaded = dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors"))
    assert_same_model(loaded, source)


def test_unmasked_k_bias_raises(original, tmp_path):
    sd = original[1]
    del sd["blocks.0.attn.qkv.bias_mask"]  # the K third of the stored bias is random
    with pytest.raises(dinofast.CheckpointError, match=r"blocks.0.attn.qkv.bias: the K third must be masked"):
        dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors"))


def test_training_only_tensors_are_dropped_with_a_warning(original, tmp_path):
    source, sd = original
    sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = torch.ones(128), torch.zeros(128)
    with pytest.warns(RuntimeWarning, match="dropped training-only tensors"):
        assert_same_model(dinofast.load_dinov3(save(sd, tmp_path / "c.safetensors")), source)


def test_transformers_directory_missing_and_extra_keys(tmp_path):
    from safetensors.torch import load_file

    source = random_model()
    source.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    assert "layer.0.norm2.bias" in sd  # save_pretrained writes the hub spelling layer.i.*
    del sd["layer.0.norm2.bias"]
    sd["layer.0.surplus"] = torch.ones(2)
    save_file(sd, str(f))
    with pytest.raises(dinofast.CheckpointError, match=r"missing keys \(1\): \['layer.0.norm2.bias'\]; "
                                                      r"unexpected keys \(1\): \['layer.0.surplus'\]"):
        dinofast.load_dinov3(tmp_path / "hf")
    sd = {("model." + k if k.startswith("layer.") else k): v for k, v in load_file(str(f)).items()}
    sd["model.layer.0.norm2.bias"] = torch.zeros(128)  # the module spelling model.layer.i.* loads too
    del sd["model.layer.0.surplus"]
    sd["model.layer.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(f))
    with pytest.raises(dinofast.CheckpointError, match=r"NaN or Inf in \['model.layer.1.mlp.up_proj.weight'\]"):
        dinofast.load_dinov3(tmp_path / "hf")


class NotATensor:
    pass


def test_pth_is_read_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.ones(1, 1, 8), "payload": NotATensor()}, str(path))
    with pytest.raises(dinofast.CheckpointError, match="could not read the file.*Weights only load failed"):
        dinofast.load_dinov3(path)


@pytest.mark.parametrize("case, match", [
    ("nothing", "expected an existing file or a transformers directory"),
    ("not_dinov3", r"not a DINOv3 checkpoint in the original layout: missing keys \(1\): \['cls_token'\]"),
    ("empty_dir", "a directory must be a transformers model directory with config.json"),
])
def test_not_a_checkpoint(tmp_path, case, match):
    path = tmp_path / "x.safetensors"
    if case == "not_dinov3":
        save_file({"weight": torch.ones(2)}, str(path))
    elif case == "empty_dir":
        path = tmp_path / "d"
        path.mkdir()
    with pytest.raises(dinofast.CheckpointError, match=match):
        dinofast.load_dinov3(path)


# ---------------------------------------------------------------------------------------------
# hostile checkpoints: refused fast, with a bounded message naming the file and the field
# ---------------------------------------------------------------------------------------------
def raises_fast(path, match, *, seconds=20.0, max_message=4000, **kw):
    """load_dinov3(path) raises CheckpointError matching `match`, within `seconds`, with a message
    of at most max_message characters."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(dinofast.CheckpointError, match=match) as info:
        dinofast.load_dinov3(path, **kw)
    assert time.perf_counter() - t0 < seconds
    assert len(str(info.value)) <= max_message, len(str(info.value))
    return str(info.value)


@pytest.mark.parametrize("index", [99999999999, 10**5, 10**30])
def test_huge_block_index_is_refused_fast(original, tmp_path, index):
    sd = original[1]
    sd[f"blocks.{index}.x"] = torch.ones(1)
    raises_fast(save(sd, tmp_path / "c.safetensors"), rf"blocks: expected layer indices 0..2 .*'{index}'")


def test_many_unexpected_keys_give_a_short_message(original, tmp_path):
    sd = original[1]
    for i in range(3000):
        sd[f"junk.{i}." + "x" * 500] = torch.ones(1)
    msg = raises_fast(save(sd, tmp_path / "c.safetensors"), r"unexpected keys \(3000\): .* and 2980 more")
    assert "x" * 200 not in msg


@pytest.fixture
def hf_dir(tmp_path):
    source = random_model()
    source.save_pretrained(tmp_path / "hf")
    return source, tmp_path / "hf"


def edit_config(directory, **fields):
    import json

    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(fields)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_num_hidden_layers_beyond_the_weights_is_refused_fast(hf_dir):
    _, d = hf_dir
    edit_config(d, num_hidden_layers=1000000)
    raises_fast(d, r"config.json.*num_hidden_layers: expected 2 \(the layers in the weights\), got 1000000")


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size", "abc", r"hidden_size: expected a positive int, got 'abc'"),
    ("num_attention_heads", 0, r"num_attention_heads: expected a positive int, got 0"),
    ("num_attention_heads", 3, r"num_attention_heads: expected a divisor of hidden_size 128"),
    ("intermediate_size", 2.5, r"intermediate_size: expected a positive int, got 2.5"),
    ("layer_norm_eps", "tiny", r"layer_norm_eps: expected a finite positive number"),
    ("num_register_tokens", -1, r"num_register_tokens: expected a non-negative int, got -1"),
    ("use_gated_mlp", "yes", r"use_gated_mlp: expected true or false, got 'yes'"),
    ("num_hidden_layers", None, r"num_hidden_layers: expected a positive int, got None"),
    (PERIODS_CONFIG_KEY, "abc", PERIODS_CONFIG_KEY + r": expected a list of 16 finite positive periods, got 'abc'"),
    (PERIODS_CONFIG_KEY, [1.0] * 15 + [0.0], PERIODS_CONFIG_KEY + r": expected a list of 16 finite positive"),
    (PERIODS_CONFIG_KEY, [[1.0] * 16], PERIODS_CONFIG_KEY + r": expected a list of 16 finite positive"),
])
def test_wrong_config_fields_name_file_and_field(hf_dir, field, value, match):
    _, d = hf_dir
    edit_config(d, **{field: value})
    raises_fast(d, r"config\.json.*" + match)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_config_that_is_not_a_json_object(hf_dir, text):
    _, d = hf_dir
    (d / "config.json").write_bytes(text.encode("latin-1"))
    raises_fast(d, r"config\.json.*config: expected a JSON object")


def test_both_layer_spellings_are_refused(hf_dir):
    from safetensors.torch import load_file

    _, d = hf_dir
    f = d / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layer.0.norm1.weight"] = sd["layer.0.norm1.weight"] + 1  # a second, different copy
    save_file(sd, str(f))
    raises_fast(d, r"spelt either `layer.i.\*` or `model.layer.i.\*`, got both")


def write_sharded(directory, shards, weight_map=None):
    """shards: {file name: state dict}; the index maps every key to its shard unless given."""
    import json

    for name, sd in shards.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / name))
    if weight_map is None:
        weight_map = {k: name for name, sd in shards.items() for k in sd}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def split_dir(hf):
    """The single-file directory re-written as two shards; returns the two halves."""
    from safetensors.torch import load_file

    sd = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    keys = sorted(sd)
    return {k: sd[k] for k in keys[::2]}, {k: sd[k] for k in keys[1::2]}


def test_sharded_directory_loads(hf_dir):
    source, d = hf_dir
    a, b = split_dir(d)
    write_sharded(d, {"model-1.safetensors": a, "model-2.safetensors": b})
    assert_same_model(dinofast.load_dinov3(d), source)


def test_same_key_in_two_shards_is_refused(hf_dir):
    _, d = hf_dir
    a, b = split_dir(d)
    key = sorted(a)[0]
    b[key] = a[key] + 1
    write_sharded(d, {"model-1.safetensors": a, "model-2.safetensors": b},
                  weight_map={**{k: "model-1.safetensors" for k in a}, **{k: "model-2.safetensors" for k in b}})
    raises_fast(d, rf"tensors stored in more than one shard \(1\): \['{key}'\]")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors",
                                   "sub/../../outside.safetensors", "link.safetensors"])
def test_shard_outside_the_directory_is_refused(hf_dir, shard):
    _, d = hf_dir
    a, b = split_dir(d)
    save_file({k: v.contiguous() for k, v in b.items()}, str(d.parent / "outside.safetensors"))
    if shard == "link.safetensors":  # a symlink inside that points out
        os.symlink(d.parent / "outside.safetensors", d / "link.safetensors")
    write_sharded(d, {"model-1.safetensors": a},
                  weight_map={**{k: "model-1.safetensors" for k in a}, **{k: shard for k in b}})
    raises_fast(d, r"model.safetensors.index.json.*weight_map: expected shard files inside the model directory")


@pytest.mark.parametrize("index, match", [
    ("{broken", r"shard index: expected a JSON object"),
    ('{"metadata": {}}', r"weight_map: expected a non-empty object"),
    ('{"weight_map": {"a": 3}}', r"weight_map\['a'\]: expected a .safetensors file name, got 3"),
    ('{"weight_map": []}', r"weight_map: expected a non-empty object"),
])
def test_bad_shard_index(hf_dir, index, match):
    _, d = hf_dir
    (d / "model.safetensors.index.json").write_text(index)
    raises_fast(d, r"model\.safetensors\.index\.json.*" + match)


def test_shard_holding_other_tensors_than_the_index_says(hf_dir):
    _, d = hf_dir
    a, b = split_dir(d)
    moved = sorted(b)[0]
    write_sharded(d, {"model-1.safetensors": a, "model-2.safetensors": b},
                  weight_map={**{k: "model-1.safetensors" for k in a}, **{k: "model-2.safetensors" for k in b},
                              moved: "model-1.safetensors"})
    raises_fast(d, r"does not hold the tensors model.safetensors.index.json assigns to it")


def test_dtype_cast_that_overflows_is_refused(original, tmp_path):
    source, sd = original
    sd["blocks.1.mlp.fc1.weight"][0, 0] = 1e6  # finite in fp32 and bf16, inf in fp16
    path = save(sd, tmp_path / "c.safetensors")
    raises_fast(path, r"dtype=torch.float16: the values of \['blocks.1.mlp.fc1.weight'\] overflow it",
                dtype=torch.float16)
    assert torch.isfinite(dinofast.load_dinov3(path, dtype=torch.bfloat16).model.layer[1].mlp.up_proj.weight).all()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool, torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_non_float_weights_are_refused_at_load(original, tmp_path, dtype, ext):
    sd = original[1]
    sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"].to(dtype)
    raises_fast(save(sd, tmp_path / f"c.{ext}"), rf"expected float32/float16/bfloat16/float64 tensors, got 1 of "
                rf"other dtypes: \{{'blocks.0.norm1.weight': '{dtype}'\}}")


def test_non_float_weight_in_a_directory_is_refused(hf_dir):
    from safetensors.torch import load_file

    _, d = hf_dir
    sd = load_file(str(d / "model.safetensors"))
    sd["layer.1.norm2.bias"] = sd["layer.1.norm2.bias"].to(torch.int32)
    save_file(sd, str(d / "model.safetensors"))
    raises_fast(d, r"model.safetensors.*'layer.1.norm2.bias': 'torch.int32'")


@pytest.mark.parametrize("key, value, match", [
    ("rope_embed.periods", lambda sd: sd["rope_embed.periods"][None], r"rope_embed.periods: expected a 1-D"),
    ("cls_token", lambda sd: torch.tensor(1.0), r"cls_token: expected shape \[1, 1, C\], got \[\]"),
    ("cls_token", lambda sd: torch.ones(2, 1, 128), r"cls_token: expected shape \[1, 1, C\], got \[2, 1, 128\]"),
    ("mask_token", lambda sd: torch.ones(1, 3), r"mask_token: expected shape \[1, 128\], got \[1, 3\]"),
    ("storage_tokens", lambda sd: torch.ones(4, 128), r"storage_tokens: expected shape \[1, R, 128\], got \[4, 128\]"),
    ("blocks.0.mlp.fc1.weight", lambda sd: torch.tensor(2.0), r"blocks.0.mlp.fc1.weight: expected a 2-D"),
])
def test_wrong_shaped_original_tensors(original, tmp_path, key, value, match):
    sd = original[1]
    sd[key] = value(sd)
    raises_fast(save(sd, tmp_path / "c.safetensors"), match)


@pytest.mark.parametrize("dtype", ["float32", torch.int32, 3])
def test_dtype_argument_must_be_a_float_dtype(original, tmp_path, dtype):
    path = save(original[1], tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"dtype: expected None or one of torch.float32"):
        dinofast.load_dinov3(path, dtype=dtype)
