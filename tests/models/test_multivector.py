"""Multi-vector page embedders (ray_vdr.models.multivector): a single-vector model with a token head, MaxSim at a
Matryoshka dim, the saved folder loaded back as it was, and the configs a multi-vector run refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ray_vdr.config import ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(path, token_dim: int = 32) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), kind="multi_vector", token_dim=token_dim, dtype="float32",
                       attn_implementation="sdpa")


def test_token_vectors_maxsim_and_a_saved_model_loads_back(tiny_qwen, page_pngs, tmp_path):
    import io

    from PIL import Image
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    from ray_vdr.models.load import build_model
    from ray_vdr.models.multivector import is_multi_vector, maxsim_scores, truncated_tokens

    model = build_model(_cfg(tiny_qwen), "cpu")
    assert isinstance(model, MultiVectorEncoder) and model.get_embedding_dimension() == 32
    assert model.prompts["query"] and model.prompts["document"], "the prompts of the single-vector model are kept"
    pages = [Image.open(io.BytesIO(b)).convert("RGB") for b in page_pngs[:3]]
    q = model.encode_query(["What was ACME's Q3 2021 revenue?", "margin"])
    p = model.encode_document(pages)
    assert all(t.ndim == 2 and t.shape[1] == 32 for t in [*q, *p])
    assert all(torch.allclose(t.norm(dim=1), torch.ones(len(t)), atol=1e-4) for t in p), "unit token vectors"

    # MaxSim: each query token's best page token, summed; at a Matryoshka dim, on cut and renormalised tokens
    for dim in (None, 16):
        qq, pp = (q, p) if dim is None else (truncated_tokens(q, dim), truncated_tokens(p, dim))
        want = [[float((a @ b.T).max(dim=1).values.sum()) for b in pp] for a in qq]
        np.testing.assert_allclose(maxsim_scores(q, p, dim), want, rtol=1e-4)

    model.save(str(tmp_path / "mv"))
    assert is_multi_vector(tmp_path / "mv") and not is_multi_vector(tiny_qwen)
    again = build_model(_cfg(tmp_path / "mv", token_dim=128), "cpu")  # its own head, whatever token_dim says
    assert torch.allclose(again.encode_query(["margin"])[0], q[1], atol=1e-5)


def test_a_multi_vector_run_refuses_what_it_cannot_train():
    from ray_vdr.train.recipes import MULTI_VECTOR

    with pytest.raises(ValueError, match="above model.token_dim 16"):
        MULTI_VECTOR.check(load_config(ROOT / "configs/demo-colvdr.yaml", ["model.token_dim=16"]))
    MULTI_VECTOR.check(load_config(ROOT / "configs/demo-colvdr.yaml"))
