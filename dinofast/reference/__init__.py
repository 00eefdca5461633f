"""Readable PyTorch references: the oracles of every test. Not tuned for speed."""
from dinofast.reference.rope2d import rope2d_reference, sample_coord_transform  # noqa: F401
from dinofast.reference.varlen_attention import varlen_attention_reference  # noqa: F401
