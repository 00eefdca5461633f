"""The data side of the packed encoder: image processing, packing and token-budget batching.
Names load on first use (the processor needs Pillow)."""
from dinofast._lazy import lazy_attributes

_LAZY = {
    **{name: "dinofast.data.processor" for name in ("IMAGENET_MEAN", "IMAGENET_STD", "Grid", "ImageProcessor",
                                                    "image_size", "image_token_string", "to_rgb")},
    **{name: "dinofast.data.sampler" for name in ("Packed", "TokenBudgetSampler", "pack")},
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
