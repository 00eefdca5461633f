"""Model layer: dinofast's ops inside real DINOv3 models (transformers' DINOv3ViTModel / Backbone).

The ops (dinofast.ops) know nothing about models; this package only rewires model modules to call
them, and loads checkpoints. Kept apart, Liger-Kernel style, so the ops stay model-agnostic.
"""
from dinofast.models.dinov3 import ImageFeatures, encode_packed, patch_dinov3, unpatch_dinov3  # noqa: F401
from dinofast.models.vision_tower import PackedFeatures, VisionTokens, VisionTower, encode_patches  # noqa: F401
from dinofast.models.checkpoint import CheckpointError, convert, load_dinov3  # noqa: F401
