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
    """The test's own writer of the original DINOv3 layout, following the documented mapping
    (shared/dinov3-reference.md): fused qkv rows [q | k | v] with a bias_mask, ls*.gamma,
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
    with pytest.raises(dinofast.CheckpointError, match=r"blocks.1.mlp.fc2.weight: expected shape \[128, 256\], got \[128, 255\]"):
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
