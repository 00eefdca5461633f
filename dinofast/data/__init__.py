"""The data side of the packed encoder: image processing, packing and token-budget batching."""
from dinofast.data.processor import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    Grid,
    ImageProcessor,
    image_size,
    image_token_string,
    to_rgb,
)
from dinofast.data.sampler import Packed, TokenBudgetSampler, pack  # noqa: F401
