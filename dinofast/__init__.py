"""dinofast: fused kernels for DINOv3-style vision transformers at high and mixed resolutions.

The ops import eagerly; the model and data layers (transformers, safetensors, Pillow) load on
first use of one of their names, so `import dinofast` stays light for kernel-only users.
"""
from dinofast._lazy import lazy_attributes

from dinofast._backend import (  # noqa: F401
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend,
)
from dinofast._debug import debug_checks  # noqa: F401
from dinofast._layout import PackedLayout  # noqa: F401
from dinofast.ops.rope2d import RopeSpec, rope2d, rope2d_  # noqa: F401
from dinofast.ops.varlen_attention import (  # noqa: F401
    flash_attn_varlen_func,
    varlen_attention,
    varlen_attention_with_lse,
)
from dinofast.reference.rope2d import sample_coord_transform  # noqa: F401
from dinofast.ops.pixel_shuffle_project import pixel_shuffle_project, shuffled_grid  # noqa: F401
from dinofast import nn  # noqa: F401

__version__ = "0.1.0"

# name -> the submodule that defines it, imported on first access
_LAZY = {
    **{name: "dinofast.models" for name in (
        "CheckpointError", "ImageFeatures", "encode_packed", "load_dinov3", "patch_dinov3", "unpatch_dinov3",
        "PackedFeatures", "VisionTokens", "VisionTower", "encode_patches")},
    **{name: "dinofast.data" for name in (
        "Grid", "ImageProcessor", "Packed", "TokenBudgetSampler", "image_token_string", "pack")},
    "FeatureStore": "dinofast.features",
    "models": "dinofast.models",
    "data": "dinofast.data",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
