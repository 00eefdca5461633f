"""Drop-in nn.Modules built on dinofast's ops."""
from dinofast.nn.rope2d import RoPE2D  # noqa: F401
from dinofast.nn.pixel_shuffle_project import PixelShuffleProjector  # noqa: F401
