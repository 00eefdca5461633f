"""The data side of the packed encoder: image processing, packing and token-budget batching.
Names load on first use (the processor needs Pillow)."""
import importlib

_LAZY = {
    **{name: "dinofast.data.processor" for name in ("IMAGENET_MEAN", "IMAGENET_STD", "Grid", "ImageProcessor",
                                                    "image_size", "image_token_string", "to_rgb")},
    **{name: "dinofast.data.sampler" for name in ("Packed", "TokenBudgetSampler", "pack")},
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dinofast.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
