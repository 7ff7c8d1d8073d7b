"""Models: the one loader jobs use (:func:`build_model`) and builders of random-weight models for tests and benches."""

from ray_vdr.models.load import build_model

__all__ = ["build_model"]
