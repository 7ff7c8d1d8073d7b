"""Builders for models with random weights, made locally (no hub reaches our machines).

Each builder takes every dimension as a parameter and writes a folder that loads with ``SentenceTransformer(path)``:

- :func:`build_qwen3vl_embedder`: the real Qwen3-VL-Embedding module stack — Transformer (feature-extraction,
  Qwen3VLModel) → Pooling(lasttoken) → Normalize, query/document prompts as system messages — at any size. The
  defaults are tiny (~250k parameters, for tests and the demo); :data:`QWEN3VL_2B_SHAPE` is the real 2B shape for
  GPU benchmarks.
- :func:`build_qwen3vl_reranker`: the real Qwen3-VL-Reranker module stack, a ``CrossEncoder`` (loads with
  ``CrossEncoder(path)``) — Transformer (any-to-any, Qwen3VLForConditionalGeneration) → LogitScore("yes", "no"),
  score = logit(yes) − logit(no) at the last position, sigmoid activation, the judge instruction as the default
  prompt (a system message). Pairs render as one user turn ``<Query>: … <Document>: …``; takes
  ``(text, PIL image)`` pairs. Same shapes as the embedder.
- :func:`build_tiny_clip`: a 2-layer CLIP dual encoder, the simplest multimodal Sentence Transformer.

Tokenizers are trained here with `tokenizers` on a small corpus, and the image processor is the PIL Qwen2-VL one
(:mod:`ray_vdr.models.qwen3vl` holds those parts and the shapes).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from ray_vdr.models.qwen3vl import (
    CORPUS,
    DEFAULT_DOCUMENT_PROMPT,
    DEFAULT_QUERY_PROMPT,
    DEFAULT_RERANK_PROMPT,
    QWEN3VL_2B_SHAPE,
    QWEN3VL_8B_SHAPE,
    QWEN3VL_CHAT_TEMPLATE,
    QWEN3VL_RERANK_CHAT_TEMPLATE,
    RERANK_FALSE_TOKEN,
    RERANK_TRUE_TOKEN,
    TINY_QWEN3VL,
    Qwen3VLShape,
    save_qwen3vl_backbone,
)

logger = logging.getLogger(__name__)

__all__ = ["QWEN3VL_2B_SHAPE", "QWEN3VL_8B_SHAPE", "RERANK_HEADS", "TINY_QWEN3VL", "build_qwen3vl_embedder",
           "build_qwen3vl_generator", "build_qwen3vl_reranker", "build_tiny_clip", "wrap_reranker"]


def build_qwen3vl_embedder(
    path: str | Path,
    shape: Qwen3VLShape = TINY_QWEN3VL,
    *,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    query_prompt: str = DEFAULT_QUERY_PROMPT,
    document_prompt: str = DEFAULT_DOCUMENT_PROMPT,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a Qwen3-VL embedder with random weights to ``path`` and return it.

    The folder has the real model's layout: a transformers Qwen3VLModel with its processor and chat template at
    the root, then Pooling(lasttoken) and Normalize modules, and the prompts in the Sentence Transformers config.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from ray_vdr.models.processor import install_image_only_processor

    install_image_only_processor()
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        save_qwen3vl_backbone(hf_dir, shape, "Qwen3VLModel", chat_template=QWEN3VL_CHAT_TEMPLATE,
                               min_pixels=min_pixels, max_pixels=max_pixels, dtype=dtype, seed=seed)
        transformer = Transformer(
            str(hf_dir),
            transformer_task="feature-extraction",
            model_kwargs={"dtype": getattr(torch, dtype)},
            processing_kwargs={"chat_template": {"add_generation_prompt": True}},
        )
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
        st = SentenceTransformer(
            modules=[transformer, pooling, Normalize()],
            prompts={"query": query_prompt, "document": document_prompt},
            device="cpu",
        )
        if path.exists():
            shutil.rmtree(path)
        st.save(str(path))
    _write_build_info(path, "qwen3vl", asdict(shape) | {"min_pixels": min_pixels, "max_pixels": max_pixels,
                                                          "dtype": dtype, "seed": seed})
    return path


RERANK_HEADS = ("logit", "dense")


def wrap_reranker(
    base: str | Path,
    path: str | Path,
    *,
    head: str = "logit",
    prompt: str = DEFAULT_RERANK_PROMPT,
    true_token: str = RERANK_TRUE_TOKEN,
    false_token: str = RERANK_FALSE_TOKEN,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Turn a Qwen3-VL checkpoint (a transformers folder or hub id: a base VLM such as Qwen/Qwen3-VL-2B-Instruct, or
    an embedder's backbone) into a reranker that loads with ``CrossEncoder(path)``; returns ``path``.

    Both head styles of Sentence Transformers' rerankers:

    - ``"logit"``: Transformer(any-to-any, the VLM with its LM head) → LogitScore(true_token, false_token): the score
      is logit(yes) − logit(no) at the last position, as Qwen3-VL-Reranker does. Nothing new to initialise.
    - ``"dense"``: Transformer(feature-extraction, the VLM without LM head) → Pooling(lasttoken) → Dense(hidden → 1,
      no activation): a new scoring layer (seeded) on the last token's hidden state.

    Pairs render with the reranker chat template (one user turn ``<Query>: … <Document>: …``, the judge instruction
    ``prompt`` as a system message and the default prompt); ``predict`` applies a sigmoid.
    """
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense
    from sentence_transformers.cross_encoder.modules import LogitScore, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from ray_vdr.models.processor import install_image_only_processor

    if head not in RERANK_HEADS:
        raise ValueError(f"reranker head must be one of {RERANK_HEADS}, got {head!r}")
    install_image_only_processor()
    path = Path(path)
    torch.manual_seed(seed)
    transformer = Transformer(
        str(base),
        transformer_task="any-to-any" if head == "logit" else "feature-extraction",
        model_kwargs={"dtype": getattr(torch, dtype)},
        processing_kwargs={"chat_template": {"add_generation_prompt": True}},
    )
    transformer.processor.chat_template = QWEN3VL_RERANK_CHAT_TEMPLATE
    if head == "logit":
        tokenizer = getattr(transformer.processor, "tokenizer", transformer.processor)
        ids = []
        for word in (true_token, false_token):
            pieces = tokenizer.encode(word, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(f"the LogitScore head needs {word!r} to be one token of {base}'s tokenizer; it "
                                 f"is {len(pieces)} tokens: use head 'dense' or other true/false tokens")
            ids.append(pieces[0])
        modules = [transformer, LogitScore(true_token_id=ids[0], false_token_id=ids[1])]
    else:
        hidden = transformer.get_embedding_dimension()
        pooling = Pooling(hidden, pooling_mode="lasttoken")
        dense = Dense(hidden, 1, activation_function=None, module_output_name="scores")
        modules = [transformer, pooling, dense.to(getattr(torch, dtype))]
    ce = CrossEncoder(modules=modules, prompts={"rerank": prompt}, default_prompt_name="rerank",
                      activation_fn=torch.nn.Sigmoid(), device="cpu")
    if path.exists():
        shutil.rmtree(path)
    ce.save(str(path))
    return path


def build_qwen3vl_reranker(
    path: str | Path,
    shape: Qwen3VLShape = TINY_QWEN3VL,
    *,
    head: str = "logit",
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    prompt: str = DEFAULT_RERANK_PROMPT,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a Qwen3-VL reranker with random weights to ``path`` and return it; it loads with ``CrossEncoder(path)``.

    ``head="logit"`` has the real Qwen3-VL-Reranker layout: a transformers Qwen3VLForConditionalGeneration (the LM
    head gives the logits) with its processor and pair chat template at the root, run as an ``any-to-any``
    Transformer, then LogitScore over the "yes" and "no" tokens (single BPE tokens here, as in Qwen's vocabulary).
    ``head="dense"`` is a reranker built on a plain Qwen3-VL backbone: last-token pooling and a Dense layer to one
    score (see :func:`wrap_reranker`). ``prompt`` is the default prompt (``"rerank"``), sent as a system message;
    predict returns a sigmoid of the score.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        architecture = "Qwen3VLForConditionalGeneration" if head == "logit" else "Qwen3VLModel"
        save_qwen3vl_backbone(
            hf_dir, shape, architecture, chat_template=QWEN3VL_RERANK_CHAT_TEMPLATE,
            min_pixels=min_pixels, max_pixels=max_pixels, dtype=dtype, seed=seed,
            words=(RERANK_TRUE_TOKEN, RERANK_FALSE_TOKEN))
        # AutoModelForMultimodalLM resolves qwen3_vl; "text-generation" (AutoModelForCausalLM) has no mapping for it
        wrap_reranker(hf_dir, path, head=head, prompt=prompt, dtype=dtype, seed=seed)
    _write_build_info(path, f"qwen3vl-reranker-{head}", asdict(shape) | {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "dtype": dtype, "seed": seed, "head": head,
        "true_token": RERANK_TRUE_TOKEN, "false_token": RERANK_FALSE_TOKEN})
    return path


def build_qwen3vl_generator(path: str | Path, shape: Qwen3VLShape = TINY_QWEN3VL, *, min_pixels: int = 32 * 32,
                            max_pixels: int = 128 * 128, dtype: str = "float32", seed: int = 0) -> Path:
    """Write a Qwen3-VL chat model (Qwen3VLForConditionalGeneration, its processor and chat template) with random
    weights to ``path`` and return it: it loads with ``AutoModelForImageTextToText`` and generates text from a page
    image and a prompt (gibberish, at this size; tests of the generation pipeline)."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        save_qwen3vl_backbone(hf_dir, shape, "Qwen3VLForConditionalGeneration", chat_template=QWEN3VL_CHAT_TEMPLATE,
                              min_pixels=min_pixels, max_pixels=max_pixels, dtype=dtype, seed=seed)
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(hf_dir, path)
    _write_build_info(path, "qwen3vl-generator", asdict(shape) | {"min_pixels": min_pixels, "max_pixels": max_pixels,
                                                                    "dtype": dtype, "seed": seed})
    return path


def build_tiny_clip(path: str | Path, *, hidden: int = 32, layers: int = 2, image_size: int = 32,
                    projection_dim: int = 16, seed: int = 0) -> Path:
    """Write a tiny CLIP dual encoder (WordLevel tokenizer, CLIPImageProcessor) to ``path``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    path = Path(path)
    words = sorted({w.strip("?.,!:;()'\"").lower() for line in CORPUS for w in line.split()} - {""})
    specials = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", unk_token="<|unk|>",
                                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", model_max_length=64)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": 2, "max_position_embeddings": 64,
                     "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
        vision_config={"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": image_size // 4},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(hf_dir)
        processor.save_pretrained(hf_dir)
        st = SentenceTransformer(modules=[Transformer(str(hf_dir))], device="cpu")
        if path.exists():
            shutil.rmtree(path)
        st.save(str(path))
    _write_build_info(path, "clip", {"hidden": hidden, "layers": layers, "image_size": image_size,
                                     "projection_dim": projection_dim, "seed": seed})
    return path


def _write_build_info(path: Path, kind: str, params: dict) -> None:
    """Record how a random-weight model was made, so nobody mistakes it for a trained one."""
    info = {"builder": kind, "random_weights": True, "params": params}
    (path / "ray_vdr_build.json").write_text(json.dumps(info, indent=2))
