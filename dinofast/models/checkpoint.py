"""DINOv3 checkpoints -> a patched transformers DINOv3ViTModel, strictly; original -> transformers conversion.

Two layouts are read (see the README):
  transformers  a directory: config.json + model.safetensors (or sharded with an index, or
                pytorch_model.bin); keys `embeddings.*`, `model.layer.i.*` (`layer.i.*` from 4.x), `norm.*`.
  original      one .safetensors or .pth file as the DINOv3 release writes it (fused qkv with a K-bias
                mask, ls*.gamma, storage_tokens, rope_embed.periods); the config is inferred from the
                tensor shapes and the variants table.
Rules: every tensor read is used and every parameter is filled, else CheckpointError lists the missing
and unexpected keys (a partly random model is never returned); the K bias must be masked; a NaN
bias_mask is repaired with a warning; a NaN/Inf weight, or one that a dtype cast would turn into Inf,
raises; only float32/float16/bfloat16/float64 tensors load; .pth files are read with
torch.load(weights_only=True) only. Hostile files are refused fast: the work and the size of every
message are bounded by the number of tensors in the file (never by an index named in a key or a
config field), a tensor named twice (two spellings, or two shards) is refused, and a shard index
can name files inside the model directory only.

Original -> transformers mapping (C = hidden size; qkv rows are [q | k | v], C each):
  cls_token [1,1,C]                -> embeddings.cls_token
  storage_tokens [1,R,C]           -> embeddings.register_tokens      (absent when R = 0)
  mask_token [1,C]                 -> embeddings.mask_token [1,1,C]
  patch_embed.proj.{weight,bias}   -> embeddings.patch_embeddings.{weight,bias}
  rope_embed.periods [D/4]         -> rope_embeddings.inv_freq = 1/periods (and config.dinofast_rope_periods)
  blocks.i.norm1/norm2.*           -> model.layer.i.norm1/norm2.*
  blocks.i.attn.qkv.weight [3C,C]  -> model.layer.i.attention.{q,k,v}_proj.weight
  blocks.i.attn.qkv.bias [3C]      -> ....{q,v}_proj.bias (times bias_mask); the K third must be masked
  blocks.i.attn.qkv.bias_mask [3C] -> consumed (NaN: repaired to [1]*C + [0]*C + [1]*C)
  blocks.i.attn.proj.*             -> model.layer.i.attention.o_proj.*
  blocks.i.ls1.gamma / ls2.gamma   -> model.layer.i.layer_scale1.lambda1 / layer_scale2.lambda1
  blocks.i.mlp.fc1.* / fc2.*       -> model.layer.i.mlp.up_proj.* / down_proj.*      (GELU)
  blocks.i.mlp.w1.* / w2.* / w3.*  -> model.layer.i.mlp.gate_proj.* / up_proj.* / down_proj.*  (SwiGLU)
  norm.*                           -> norm.*
  local_cls_norm.*                 -> dropped with a warning (used only in training)
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

# Released variants: hidden size -> number of heads (head dim 64; 7B: 128).
VARIANT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
# Released settings that the tensors cannot tell.
RELEASE_CONFIG = dict(layer_norm_eps=1e-5, rope_theta=100.0, pos_embed_rescale=2.0, layerscale_value=1.0)
# Config key under which stored rope periods travel in a transformers directory.
PERIODS_CONFIG_KEY = "dinofast_rope_periods"
# Original-layout tensors that exist only for training: read, dropped, reported.
TRAINING_ONLY = re.compile(r"^local_cls_norm\.")
# Tensor dtypes a DINOv3 checkpoint may hold (int/bool/complex/float8 weights are refused at load).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Keys named in one message, and characters of one key: a hostile key set must not make a huge error.
MAX_KEYS_SHOWN, MAX_KEY_CHARS = 20, 120


class CheckpointError(ValueError):
    """A checkpoint that cannot become a complete, finite DINOv3 model."""


def _fail(path, what: str):
    raise CheckpointError(f"load_dinov3({str(path)!r}): {what}")


def _short(key: str) -> str:
    return key if len(key) <= MAX_KEY_CHARS else key[:MAX_KEY_CHARS] + "..."


def _keys(keys) -> str:
    """Sorted keys, at most MAX_KEYS_SHOWN of them, each at most MAX_KEY_CHARS long."""
    keys = sorted(keys)
    shown = [_short(k) for k in keys[:MAX_KEYS_SHOWN]]
    return f"{shown}" + (f" and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else "")


def _key_report(missing, unexpected) -> str:
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_keys(unexpected)}")
    return "; ".join(parts)


def _check_dtypes(path, sd: Dict[str, Tensor]) -> None:
    """Every tensor a real floating dtype: an int/bool/complex/float8 weight would load and then fail
    (or silently compute garbage) at the first forward."""
    bad = {k: t.dtype for k, t in sd.items() if t.dtype not in WEIGHT_DTYPES}
    if bad:
        shown = {_short(k): str(bad[k]) for k in sorted(bad)[:MAX_KEYS_SHOWN]}
        _fail(path, f"expected float32/float16/bfloat16/float64 tensors, got {len(bad)} of other dtypes: {shown}")


def _layer_indices(path, keys, pattern: str, config_field: str) -> int:
    """The number of layers named by `keys` matching pattern (one group: the index), which must be
    exactly 0..n-1. Bounded by the number of keys, whatever index a key names."""
    found = {m.group(1) for k in keys for m in [re.match(pattern, k)] if m}
    indices = sorted(int(i) for i in found if len(i) <= 18)  # longer digit strings cannot be a layer
    n = len(found)
    if len(indices) != n or (indices and indices[-1] != n - 1):
        wrong = sorted(found - {str(i) for i in range(n)}, key=lambda i: (len(i), i))
        _fail(path, f"{config_field}: expected layer indices 0..{n - 1} for the {n} layers in the file, got "
              f"indices {[_short(i) for i in wrong[:MAX_KEYS_SHOWN]]}"
              + (" ..." if len(wrong) > MAX_KEYS_SHOWN else ""))
    return n


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def read_tensors(path) -> Dict[str, Tensor]:
    """Every tensor of one .safetensors or .pth/.pt/.bin file, on CPU. .pth: weights_only=True."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        _fail(path, "expected an existing file or a transformers directory, got nothing at that path")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated/corrupt file surfaces as many error types
        _fail(path, f"could not read the file (truncated or corrupt?): {type(err).__name__}: {err}")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        _fail(path, f"expected a flat state dict {{name: tensor}}, got {type(sd).__name__}"
              + (f" with keys {[_short(str(k)) for k in list(sd)[:8]]}" if isinstance(sd, dict) else ""))
    _check_dtypes(path, sd)
    return sd


def _read_json(path: str, what: str) -> dict:
    """A JSON object from `path`, or CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        _fail(path, f"{what}: expected a JSON object, could not read it: {type(err).__name__}: {str(err)[:200]}")
    if not isinstance(data, dict):
        _fail(path, f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _shard_files(path: str, index: str) -> List[Tuple[str, List[str]]]:
    """[(shard file, keys the index assigns to it)] from model.safetensors.index.json; every shard a
    file inside the model directory (no `..`, no absolute path, no symlink out)."""
    weight_map = _read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        _fail(index, f"weight_map: expected a non-empty object {{tensor name: shard file}}, got "
              f"{type(weight_map).__name__}")
    root = os.path.realpath(path)
    by_shard: Dict[str, List[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            _fail(index, f"weight_map[{_short(key)!r}]: expected a .safetensors file name, got {_short(repr(shard))}")
        by_shard.setdefault(shard, []).append(key)
    out = []
    for shard, keys in sorted(by_shard.items()):
        full = os.path.realpath(os.path.join(root, shard))
        if os.path.isabs(shard) or not full.startswith(root + os.sep):
            _fail(index, f"weight_map: expected shard files inside the model directory, got {_short(shard)!r}")
        out.append((full, keys))
    return out


def _read_transformers_dir(path: str) -> Tuple[Dict[str, Tensor], Callable[[str], str]]:
    """(state dict keyed as the 5.x modules name them, display: model key -> key as the file spells it)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = _shard_files(path, index)
    else:
        shards = [(os.path.join(path, n), None) for n in ("model.safetensors", "pytorch_model.bin")
                  if os.path.isfile(os.path.join(path, n))][:1]
    if not shards:
        _fail(path, "expected model.safetensors, model.safetensors.index.json or pytorch_model.bin in the directory")
    sd: Dict[str, Tensor] = {}
    held = []
    for f, listed in shards:
        part = read_tensors(f)
        twice = [k for k in part if k in sd]
        if twice:  # a silent update() would keep whichever shard came last
            _fail(path, f"tensors stored in more than one shard ({len(twice)}): {_keys(twice)}")
        sd.update(part)
        held.append((f, listed, set(part)))
    for f, listed, keys in held:
        if listed is not None and set(listed) != keys:
            _fail(f, "the shard does not hold the tensors model.safetensors.index.json assigns to it: "
                  + _key_report(set(listed) - keys, keys - set(listed)))
    # save_pretrained writes the encoder layers as `layer.i.*` (the hub layout); the 5.x module
    # path is `model.layer.i.*`. Either is accepted, not both: a file with both would load one and
    # silently drop the other.
    hub = any(k.startswith("layer.") for k in sd)
    if hub and any(k.startswith("model.layer.") for k in sd):
        both = [k for k in sd if k.startswith("layer.")][:MAX_KEYS_SHOWN]
        _fail(path, "expected encoder layers spelt either `layer.i.*` or `model.layer.i.*`, got both "
              f"(e.g. {_keys(both)})")
    sd = {("model." + k if k.startswith("layer.") else k): v for k, v in sd.items()}
    return sd, (lambda k: k[len("model."):] if hub and k.startswith("model.layer.") else k)


# ---------------------------------------------------------------------------------------------
# Original layout -> transformers layout
# ---------------------------------------------------------------------------------------------
def _bias_mask(path, key: str, mask: Optional[Tensor], C: int) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.shape != (3 * C,):
        _fail(path, f"{key}: expected shape [{3 * C}], got {list(mask.shape)}")
    if not torch.isfinite(mask).all():
        warnings.warn(f"load_dinov3: {key} holds NaN (as in a model built and never loaded); repaired to the "
                      "[1]*C + [0]*C + [1]*C pattern that masks the K bias", RuntimeWarning, stacklevel=4)
        mask = torch.cat([torch.ones(C), torch.zeros(C), torch.ones(C)]).to(mask.dtype)
    return mask


def original_to_transformers(sd: Dict[str, Tensor], path="<state dict>"
                             ) -> Tuple[dict, Dict[str, Tensor], Optional[Tensor], Dict[str, str]]:
    """(config kwargs, transformers state dict, stored periods or None, {transformers key: original key})
    from an original-layout state dict.

    Raises CheckpointError listing missing/unexpected keys, or naming a wrong shape or an unmasked K bias."""
    used, missing = set(), []

    def take(key: str, required: bool = True) -> Optional[Tensor]:
        if key in sd:
            used.add(key)
            return sd[key]
        if required:
            missing.append(key)
        return None

    for key in ("cls_token", "patch_embed.proj.weight"):
        if key not in sd:
            _fail(path, f"not a DINOv3 checkpoint in the original layout: {_key_report([key], [])} "
                  f"(found {len(sd)} keys such as {sorted(sd)[:6]})")
    cls_shape = tuple(sd["cls_token"].shape)
    if len(cls_shape) != 3 or cls_shape[:2] != (1, 1) or cls_shape[2] == 0:
        _fail(path, f"cls_token: expected shape [1, 1, C], got {list(cls_shape)}")
    C = cls_shape[2]
    patch_w = sd["patch_embed.proj.weight"]
    if patch_w.dim() != 4 or patch_w.shape[0] != C or patch_w.shape[2] != patch_w.shape[3]:
        _fail(path, f"patch_embed.proj.weight: expected [C={C}, channels, p, p], got {list(patch_w.shape)}")
    depth = _layer_indices(path, sd, r"blocks\.(\d+)\.", "blocks")
    if depth == 0:
        _fail(path, _key_report(["blocks.0.*"], []))
    periods = take("rope_embed.periods", required=False)
    if periods is not None and periods.dim() != 1:
        _fail(path, f"rope_embed.periods: expected a 1-D [head_dim/4] tensor, got shape {list(periods.shape)}")
    if periods is not None:
        head_dim = 4 * periods.numel()
    elif C in VARIANT_HEADS:
        head_dim = C // VARIANT_HEADS[C]
    else:
        _fail(path, f"cannot tell the number of heads: no rope_embed.periods and hidden size {C} is not in the "
              f"variants table {sorted(VARIANT_HEADS)}")
    if head_dim <= 0 or C % head_dim:
        _fail(path, f"rope_embed.periods: expected [head_dim/4] with head_dim dividing {C}, got {list(periods.shape)}")
    gated = "blocks.0.mlp.w1.weight" in sd
    mlp_names = (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")) if gated else \
        (("fc1", "up_proj"), ("fc2", "down_proj"))
    hidden_name = "w1" if gated else "fc1"
    hidden = sd.get(f"blocks.0.mlp.{hidden_name}.weight")
    if hidden is not None and hidden.dim() != 2:
        _fail(path, f"blocks.0.mlp.{hidden_name}.weight: expected a 2-D [hidden, {C}] weight, got shape "
              f"{list(hidden.shape)}")
    storage = take("storage_tokens", required=False)
    if storage is not None and (storage.dim() != 3 or storage.shape[0] != 1 or storage.shape[2] != C):
        _fail(path, f"storage_tokens: expected shape [1, R, {C}], got {list(storage.shape)}")
    if "mask_token" in sd and sd["mask_token"].numel() != C:
        _fail(path, f"mask_token: expected shape [1, {C}], got {list(sd['mask_token'].shape)}")
    config = dict(
        RELEASE_CONFIG,
        hidden_size=C, num_hidden_layers=depth, num_attention_heads=C // head_dim,
        intermediate_size=int(hidden.shape[0]) if hidden is not None else 4 * C,
        patch_size=int(patch_w.shape[-1]), num_channels=int(patch_w.shape[1]),
        num_register_tokens=0 if storage is None else int(storage.shape[1]),
        use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        query_bias="blocks.0.attn.qkv.bias" in sd, key_bias=False, value_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd, mlp_bias=f"blocks.0.mlp.{hidden_name}.bias" in sd,
    )

    out: Dict[str, Tensor] = {}
    names: Dict[str, str] = {}  # for error messages in the user's (original) key names
    cls = take("cls_token")
    out["embeddings.cls_token"] = cls.reshape(1, 1, C)
    out["embeddings.register_tokens"] = storage if storage is not None else cls.new_zeros(1, 0, C)
    mask_token = take("mask_token")
    if mask_token is not None:
        out["embeddings.mask_token"] = mask_token.reshape(1, 1, C)
    out["embeddings.patch_embeddings.weight"] = take("patch_embed.proj.weight")
    if (b := take("patch_embed.proj.bias")) is not None:
        out["embeddings.patch_embeddings.bias"] = b

    def copy(src: str, dst: str, bias: bool = True):
        for suffix in ("weight", "bias") if bias else ("weight",):
            t = take(f"{src}.{suffix}")
            if t is not None:
                out[f"{dst}.{suffix}"] = t
                names[f"{dst}.{suffix}"] = f"{src}.{suffix}"

    for i in range(depth):
        s, d = f"blocks.{i}", f"model.layer.{i}"
        copy(f"{s}.norm1", f"{d}.norm1")
        copy(f"{s}.norm2", f"{d}.norm2")
        qkv_w = take(f"{s}.attn.qkv.weight")
        if qkv_w is not None:
            if qkv_w.shape != (3 * C, C):
                _fail(path, f"{s}.attn.qkv.weight: expected shape [{3 * C}, {C}], got {list(qkv_w.shape)}")
            for name, part in zip("qkv", qkv_w.split(C)):
                out[f"{d}.attention.{name}_proj.weight"] = part.clone()
                names[f"{d}.attention.{name}_proj.weight"] = f"{s}.attn.qkv.weight"
        if config["query_bias"]:
            bias = take(f"{s}.attn.qkv.bias")
            mask = _bias_mask(path, f"{s}.attn.qkv.bias_mask", take(f"{s}.attn.qkv.bias_mask", required=False), C)
            if bias is not None:
                if bias.shape != (3 * C,):
                    _fail(path, f"{s}.attn.qkv.bias: expected shape [{3 * C}], got {list(bias.shape)}")
                if mask is not None:  # LinearKMaskedBias: bias * bias_mask (a masked entry is 0 even if NaN)
                    bias = torch.where(mask == 0, torch.zeros_like(bias), bias * mask.to(bias.dtype))
                q_b, k_b, v_b = bias.split(C)
                if (k_b != 0).any():
                    _fail(path, f"{s}.attn.qkv.bias: the K third must be masked (zero, or zeroed by bias_mask) since "
                          f"DINOv3 has no key bias; got max |K bias| = {k_b.abs().max().item():.3g}")
                out[f"{d}.attention.q_proj.bias"] = q_b.clone()
                out[f"{d}.attention.v_proj.bias"] = v_b.clone()
                names[f"{d}.attention.q_proj.bias"] = names[f"{d}.attention.v_proj.bias"] = f"{s}.attn.qkv.bias"
        copy(f"{s}.attn.proj", f"{d}.attention.o_proj", bias=config["proj_bias"])
        for ls, dst in (("ls1", "layer_scale1"), ("ls2", "layer_scale2")):
            if (g := take(f"{s}.{ls}.gamma")) is not None:
                out[f"{d}.{dst}.lambda1"] = g
                names[f"{d}.{dst}.lambda1"] = f"{s}.{ls}.gamma"
        for src, dst in mlp_names:
            copy(f"{s}.mlp.{src}", f"{d}.mlp.{dst}", bias=config["mlp_bias"])
    copy("norm", "norm")

    dropped = sorted(k for k in sd if k not in used and TRAINING_ONLY.match(k))
    if dropped:
        warnings.warn(f"load_dinov3: dropped training-only tensors {dropped}", RuntimeWarning, stacklevel=3)
    unexpected = [k for k in sd if k not in used and k not in dropped]
    if missing or unexpected:
        _fail(path, "the original-layout checkpoint does not match a DINOv3 model: " + _key_report(missing, unexpected))
    names.update({"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
                  "embeddings.mask_token": "mask_token",
                  "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
                  "embeddings.patch_embeddings.bias": "patch_embed.proj.bias"})
    return config, out, periods, names


# ---------------------------------------------------------------------------------------------
# Building the model
# ---------------------------------------------------------------------------------------------
def _check_finite(path, sd: Dict[str, Tensor], display) -> None:
    bad = [display(k) for k, t in sd.items() if not torch.isfinite(t).all()]
    if bad:
        _fail(path, f"NaN or Inf in {_keys(bad)}: refusing to build a model that outputs garbage")


def _build(path, config, sd: Dict[str, Tensor], periods: Optional[Tensor], dtype, device, display):
    """An unpatched DINOv3ViTModel holding exactly `sd` (strict: missing/unexpected/shape -> CheckpointError).
    display(key) names a model key as the file names it, for messages."""
    from transformers import DINOv3ViTModel

    with torch.device("meta"):  # no random init: every parameter must come from the file
        model = DINOv3ViTModel(config)
    expected = model.state_dict()
    missing = [display(k) for k in expected if k not in sd]
    unexpected = [display(k) for k in sd if k not in expected]
    if missing or unexpected:
        _fail(path, "the checkpoint does not match the DINOv3ViTModel of its config: "
              + _key_report(missing, unexpected))
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            _fail(path, f"{display(k)}: expected shape {list(t.shape)}, got {list(sd[k].shape)}")
    if dtype is None:
        dtype = sd["embeddings.patch_embeddings.weight"].dtype
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    # every weight was finite before the cast: a non-finite one now is a value the dtype cannot hold
    overflow = [display(k) for k, t in sd.items() if not torch.isfinite(t).all()]
    if overflow:
        _fail(path, f"dtype={dtype}: the values of {_keys(overflow)} overflow it (|w| > "
              f"{torch.finfo(dtype).max:.4g}); load with a wider dtype")
    model.load_state_dict(sd, strict=True, assign=True)
    head_dim = config.hidden_size // config.num_attention_heads
    if periods is not None:
        inv = 1.0 / periods.to(device=device, dtype=torch.float32)
    else:
        inv = 1 / config.rope_theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
    model.rope_embeddings.inv_freq = inv
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # cannot happen after the key check above; a guard against a transformers change
        _fail(path, f"parameters left unfilled: {left}")
    model.config.dtype = dtype
    return model.eval()


def _read_periods(path, config, use_stored_periods: bool) -> Optional[Tensor]:
    stored = getattr(config, PERIODS_CONFIG_KEY, None)
    if stored is None or not use_stored_periods:
        return None
    head_dim = config.hidden_size // config.num_attention_heads
    expected = f"a list of {head_dim // 4} finite positive periods"
    if not isinstance(stored, list) or not all(_is_number(v) for v in stored):
        _fail(os.path.join(path, "config.json"), f"{PERIODS_CONFIG_KEY}: expected {expected}, got "
              f"{_short(repr(stored))}")
    periods = torch.tensor(stored, dtype=torch.float32)
    if periods.shape != (head_dim // 4,) or not torch.isfinite(periods).all() or (periods <= 0).any():
        _fail(os.path.join(path, "config.json"), f"{PERIODS_CONFIG_KEY}: expected {expected}, got "
              f"{_short(repr(stored))}")
    return periods


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# config.json fields the model is built from: (check, what is expected). Absent fields take
# transformers' defaults; present ones must have the right type before anything is built from them.
CONFIG_FIELDS = {
    "hidden_size": (lambda v: _is_count(v) and v > 0, "a positive int"),
    "num_hidden_layers": (lambda v: _is_count(v) and v > 0, "a positive int"),
    "num_attention_heads": (lambda v: _is_count(v) and v > 0, "a positive int"),
    "intermediate_size": (lambda v: _is_count(v) and v > 0, "a positive int"),
    "num_channels": (lambda v: _is_count(v) and v > 0, "a positive int"),
    "num_register_tokens": (lambda v: _is_count(v) and v >= 0, "a non-negative int"),
    "patch_size": (lambda v: _is_count(v) and v > 0, "a positive int"),
    "layer_norm_eps": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite positive number"),
    "rope_theta": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite positive number"),
    "layerscale_value": (lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
    "hidden_act": (lambda v: isinstance(v, str), "a string"),
    **{name: (lambda v: isinstance(v, bool), "true or false")
       for name in ("use_gated_mlp", "query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias")},
}


def _read_config(path: str):
    """DINOv3ViTConfig of a transformers directory, every field the model is built from checked."""
    from transformers import DINOv3ViTConfig

    file = os.path.join(path, "config.json")
    raw = _read_json(file, "config")
    for name, (ok, expected) in CONFIG_FIELDS.items():
        if name in raw and not ok(raw[name]):
            _fail(file, f"{name}: expected {expected}, got {_short(repr(raw[name]))}")
    try:
        config = DINOv3ViTConfig.from_pretrained(path)
    except Exception as err:  # transformers raises many types for a config it cannot take
        _fail(file, f"not a DINOv3ViTConfig: {type(err).__name__}: {str(err)[:200]}")
    for name, (ok, expected) in CONFIG_FIELDS.items():
        if not ok(getattr(config, name, None)):
            _fail(file, f"{name}: expected {expected}, got {_short(repr(getattr(config, name, None)))}")
    if config.hidden_size % config.num_attention_heads or (config.hidden_size // config.num_attention_heads) % 4:
        _fail(file, f"num_attention_heads: expected a divisor of hidden_size {config.hidden_size} leaving a head "
              f"dim that is a multiple of 4, got {config.num_attention_heads}")
    return config


def load_unpatched(path, *, dtype=None, device=None, use_stored_periods: bool = True):
    """load_dinov3 without patching: (transformers DINOv3ViTModel, stored periods or None)."""
    from transformers import DINOv3ViTConfig

    path = os.fspath(path)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in WEIGHT_DTYPES):
        raise ValueError(f"dtype: expected None or one of {', '.join(map(str, WEIGHT_DTYPES))}, got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            _fail(path, "a directory must be a transformers model directory with config.json")
        config = _read_config(path)
        sd, display = _read_transformers_dir(path)
        # checked before the model is built: building one walks every layer the config names
        layers = _layer_indices(path, sd, r"model\.layer\.(\d+)\.", "layers")
        if config.num_hidden_layers != layers:
            _fail(os.path.join(path, "config.json"), f"num_hidden_layers: expected {layers} (the layers in the "
                  f"weights), got {config.num_hidden_layers}")
        periods = _read_periods(path, config, use_stored_periods)
    else:
        config_kwargs, sd, periods, names = original_to_transformers(read_tensors(path), path)
        display = lambda k: names.get(k, k)  # noqa: E731
        config = DINOv3ViTConfig(**config_kwargs)
        if periods is not None:
            periods = periods.float()
            if not torch.isfinite(periods).all() or (periods <= 0).any():
                _fail(path, "rope_embed.periods: expected finite positive periods")
            periods = periods if use_stored_periods else None
    # model.config tells the periods the model runs with (and save_pretrained keeps them)
    if periods is not None:
        setattr(config, PERIODS_CONFIG_KEY, periods.tolist())
    elif hasattr(config, PERIODS_CONFIG_KEY):
        delattr(config, PERIODS_CONFIG_KEY)
    _check_finite(path, sd, display)
    return _build(path, config, sd, periods, dtype, device, display), periods


def load_dinov3(path, *, dtype: Optional[torch.dtype] = None, device=None, use_stored_periods: bool = True):
    """A dinofast-patched transformers DINOv3ViTModel (eval mode) from a checkpoint.

    path: a transformers directory (config.json + *.safetensors / pytorch_model.bin), or one
      .safetensors / .pth file in the original DINOv3 layout (config inferred from shapes).
    dtype: parameter dtype (default: the checkpoint's patch-embedding dtype). device: default CPU.
    use_stored_periods: use the checkpoint's rope periods (original `rope_embed.periods`, or
      config.dinofast_rope_periods written by `python -m dinofast convert`) instead of recomputing
      them from theta.
    Raises CheckpointError (a ValueError) for missing/unexpected keys, wrong shapes, an unmasked K
    bias, NaN/Inf weights or an unreadable file; repairs a NaN bias_mask with a warning.
    """
    from dinofast.models.dinov3 import patch_dinov3

    model, _ = load_unpatched(path, dtype=dtype, device=device, use_stored_periods=use_stored_periods)
    return patch_dinov3(model)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def convert(src, dst) -> str:
    """Write the original-layout checkpoint `src` (.safetensors or .pth) as a transformers directory
    `dst` (config.json + model.safetensors; stored rope periods kept in config.dinofast_rope_periods,
    which load_dinov3 honours and transformers ignores). Returns dst. dst must not exist or be empty."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.isdir(src):
        raise ValueError(f"src: expected an original-layout .safetensors or .pth file, got the directory {src!r}")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"dst: expected a new or empty directory, got existing {dst!r}")
    model, _ = load_unpatched(src, use_stored_periods=True)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m dinofast convert SRC DST`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dinofast convert",
        description="Write an original-layout DINOv3 checkpoint as a transformers directory.")
    parser.add_argument("src", help="original-layout .safetensors or .pth file")
    parser.add_argument("dst", help="new transformers directory")
    args = parser.parse_args(argv)
    try:
        dst = convert(args.src, args.dst)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    from transformers import DINOv3ViTConfig

    cfg = DINOv3ViTConfig.from_pretrained(dst)
    print(f"wrote {dst}: DINOv3 hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, {cfg.num_register_tokens} registers, "
          f"{'SwiGLU' if cfg.use_gated_mlp else 'GELU'} MLP"
          + (", stored rope periods kept" if getattr(cfg, PERIODS_CONFIG_KEY, None) else ""))
    return 0
