"""Model layer: dinofast's ops inside real DINOv3 models (transformers' DINOv3ViTModel / Backbone).

The ops (dinofast.ops) know nothing about models; this package only rewires model modules to call
them, and loads checkpoints. Kept apart, Liger-Kernel style, so the ops stay model-agnostic.
Names load on first use (the checkpoint code needs safetensors and transformers).
"""
import importlib

_LAZY = {
    **{name: "dinofast.models.dinov3" for name in ("ImageFeatures", "encode_packed", "patch_dinov3",
                                                   "unpatch_dinov3")},
    **{name: "dinofast.models.checkpoint" for name in ("CheckpointError", "convert", "load_dinov3")},
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dinofast.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
