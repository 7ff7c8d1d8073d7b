"""Multi-vector (late-interaction, ColPali/ColQwen style) page embedders: Sentence Transformers' MultiVectorEncoder.

A multi-vector model keeps one vector per token (text tokens of a query, image patches of a page) and scores a
(query, page) pair with MaxSim: the sum over the query's tokens of each one's best match among the page's tokens.

:func:`build_multi_vector` makes one from any of:

- a MultiVectorEncoder folder (saved by a training run, or a hub model such as a ColQwen checkpoint): loaded as it is;
- a single-vector Sentence Transformers folder (the tiny Qwen3-VL embedder, Qwen/Qwen3-VL-Embedding-2B): its
  transformer with its processor, chat template and prompts, and a new token head — a ``token_dim`` projection of
  every token (seeded: equal on every rank), the scoring mask and L2 normalisation. The pooling is dropped.

Matryoshka dims apply to the token vectors: a prefix of each, L2-normalised again (:func:`truncated_tokens`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

__all__ = ["build_multi_vector", "is_multi_vector", "is_multi_vector_model", "maxsim_scores", "truncated_tokens"]


def is_multi_vector(path: str | Path) -> bool:
    """Whether the Sentence Transformers folder at ``path`` holds a MultiVectorEncoder."""
    config = Path(path) / "config_sentence_transformers.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "MultiVectorEncoder"


def is_multi_vector_model(model) -> bool:
    """Whether ``model`` (loaded) is a MultiVectorEncoder: token vectors scored by MaxSim."""
    return getattr(model, "model_type", None) == "MultiVectorEncoder"


def build_multi_vector(path: str, device: str, model_kwargs: dict, *, token_dim: int,
                       trust_remote_code: bool = False, seed: int = 0) -> MultiVectorEncoder:
    """The MultiVectorEncoder in ``path``, or one made from the single-vector model there (see the module)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    if is_multi_vector(path):
        return MultiVectorEncoder(path, device=device, model_kwargs=model_kwargs, trust_remote_code=trust_remote_code)
    single = SentenceTransformer(path, device="cpu", model_kwargs=model_kwargs, trust_remote_code=trust_remote_code)
    transformer = single[0]
    hidden = transformer.get_embedding_dimension()
    if hidden is None:
        raise ValueError(f"{path}: cannot tell the hidden size of its transformer to build a token head on")
    if token_dim > hidden:
        raise ValueError(f"model.token_dim {token_dim} is larger than the transformer's hidden size {hidden}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Dense(in_features=hidden, out_features=token_dim, bias=False,
                     activation_function=torch.nn.Identity(), module_input_name="token_embeddings")
    dtype = next(transformer.parameters()).dtype
    head.to(dtype)
    prompts = {k: v for k, v in single.prompts.items() if k in ("query", "document") and v}
    modules = [transformer, head, MultiVectorMask(), Normalize(module_input_name="token_embeddings")]
    return MultiVectorEncoder(modules=modules, prompts=prompts, device=device)


def truncated_tokens(tokens: list, dim: int) -> list:
    """Each input's token vectors cut to their first ``dim`` components and L2-normalised (a Matryoshka dim)."""
    import torch

    out = []
    for t in tokens:
        t = torch.as_tensor(t, dtype=torch.float32)[:, :dim]
        out.append(t / t.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return out


def maxsim_scores(queries: list, pages: list, dim: int | None = None) -> np.ndarray:
    """The (queries x pages) MaxSim scores of token-vector lists, at ``dim`` (None: as they are)."""
    from sentence_transformers.multi_vector_encoder import maxsim

    if dim is not None:
        queries, pages = truncated_tokens(queries, dim), truncated_tokens(pages, dim)
    return maxsim(queries, pages).float().cpu().numpy()
