"""Model layer: dinofast's ops inside real DINOv3 models (transformers' DINOv3ViTModel / Backbone).

The ops (dinofast.ops) know nothing about models; this package only rewires model modules to call
them, and loads checkpoints. Kept apart, Liger-Kernel style, so the ops stay model-agnostic.
Names load on first use (the checkpoint code needs safetensors and transformers).
"""
from dinofast._lazy import lazy_attributes

_LAZY = {
    **{name: "dinofast.models.dinov3" for name in ("ImageFeatures", "encode_packed", "patch_dinov3",
                                                   "unpatch_dinov3")},
    **{name: "dinofast.models.vision_tower" for name in ("PackedFeatures", "VisionTokens", "VisionTower",
                                                         "encode_patches")},
    **{name: "dinofast.models.checkpoint" for name in ("CheckpointError", "convert", "load_dinov3")},
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
