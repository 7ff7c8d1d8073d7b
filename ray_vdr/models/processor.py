"""Qwen3-VL processing on machines without torchvision.

The stock ``Qwen3VLProcessor`` always builds a video processor, and transformers' video processors need
torchvision. On CPU machines torchvision is absent on purpose (no CPU build matches our torch), so the stock
processor cannot even be constructed there. This module provides the same processor without its video part
(images and text behave exactly as upstream; videos are rejected) and, only when torchvision is missing, makes
``AutoProcessor`` resolve the name ``Qwen3VLProcessor`` to it. Saved folders therefore keep the upstream
``processor_class`` and load with the stock processor wherever torchvision exists (CUDA images).
"""

from __future__ import annotations

import importlib.util
import logging

from transformers.models.qwen3_vl import processing_qwen3_vl

logger = logging.getLogger(__name__)

_StockQwen3VLProcessor = processing_qwen3_vl.Qwen3VLProcessor


class Qwen3VLProcessor(_StockQwen3VLProcessor):
    """Upstream Qwen3VLProcessor minus the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # the parent passes a third positional (video_processor); ProcessorMixin zips args with our two attributes
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("video inputs need torchvision; this environment has the image-only Qwen3-VL processor")
        return super().__call__(images=images, text=text, **kwargs)


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


_installed = False


def install_image_only_processor(force: bool = False) -> bool:
    """Route ``Qwen3VLProcessor`` to the image-only class when torchvision is missing. Idempotent.

    Returns True when the image-only processor is in use.
    """
    global _installed
    if _installed:
        return True
    if torchvision_available() and not force:
        return False
    import transformers.models.qwen3_vl as qwen3_vl_pkg

    # AutoProcessor resolves processor_class names with getattr on this package (processor_class_from_name)
    qwen3_vl_pkg.Qwen3VLProcessor = Qwen3VLProcessor
    processing_qwen3_vl.Qwen3VLProcessor = Qwen3VLProcessor
    _installed = True
    logger.debug("torchvision not found: Qwen3-VL processors load image-only")
    return True
