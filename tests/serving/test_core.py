"""The endpoint's core without Ray: request limits, the image-query guard, result merging and the serve config's
consistency rules."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from ray_vdr.config import ConfigError, ServeConfig, ServeLimits, load_config
from ray_vdr.protocol import SearchRequest
from serving.core import RequestError, merge_results, parse_request

LIMITS = ServeLimits(max_top_k=20, max_rerank_depth=10, default_rerank_depth=5, max_query_chars=50)


def _b64_png(size=(64, 80), color="white", fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def bomb_png() -> str:
    """A 20000x20000 1-bit PNG: ~50 KB encoded, 400 M pixels decoded."""
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000), 1).save(buf, "PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def test_valid_requests_get_defaults_and_bounds():
    q = parse_request(SearchRequest(query="  revenue 2021 "), LIMITS, rerank_available=True)
    assert (q.text, q.top_k, q.rerank_depth, q.image) == ("revenue 2021", 10, 5, None)
    assert parse_request(SearchRequest(query="x"), LIMITS, rerank_available=False).rerank_depth == 0
    img = parse_request(SearchRequest(image="data:image/png;base64," + _b64_png(), top_k=20), LIMITS, True)
    assert img.image.size == (64, 80) and img.rerank_depth == 0, "an image-only query is not reranked"
    both = parse_request(SearchRequest(query="chart", image=_b64_png()), LIMITS, True)
    assert both.item is both.image and both.rerank_depth == 5


@pytest.mark.parametrize("body, status, says", [
    ({}, 422, "non-empty"),
    ({"query": "   "}, 422, "non-empty"),
    ({"query": "x" * 51}, 422, "51 characters"),
    ({"query": "x", "top_k": 0}, 422, "top_k must be between 1 and 20"),
    ({"query": "x", "top_k": 21}, 422, "top_k must be between 1 and 20"),
    ({"query": "x", "rerank_depth": -1}, 422, "rerank_depth must be between 0 and 10"),
    ({"query": "x", "rerank_depth": 11}, 422, "rerank_depth must be between 0 and 10"),
    ({"image": "https://example.com/page.png"}, 422, "never fetches URLs"),
    ({"image": "not base64 !!"}, 422, "not valid base64"),
    ({"image": base64.b64encode(b"%PDF-1.4 not an image").decode()}, 422, "corrupt_image"),
    ({"image": _b64_png(size=(8, 8))}, 422, "too_small"),
    ({"image": "A" * 10_000_000}, 413, "larger than"),
])
def test_bad_requests_are_refused_with_the_reason(body, status, says):
    with pytest.raises(RequestError) as e:
        parse_request(SearchRequest(**body), LIMITS, rerank_available=True)
    assert e.value.status == status and says in str(e.value)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(RequestError, match="decompression_bomb"):
        parse_request(SearchRequest(image=bomb_png()), LIMITS, rerank_available=True)


def test_rerank_depth_without_a_reranker_is_refused():
    with pytest.raises(RequestError, match="no reranker"):
        parse_request(SearchRequest(query="x", rerank_depth=3), LIMITS, rerank_available=False)


def _hits(n):
    return [{"key": f"k{i}", "doc_id": f"d{i}", "source": "s", "page": 1, "score": 1.0 - i / 10, "rank": i + 1,
             "position": i} for i in range(n)]


def test_merge_reranks_the_head_and_keeps_the_tail():
    out = merge_results(_hits(6), np.array([0.1, 0.9, 0.5], np.float32), top_k=5)
    assert [r.doc_id for r in out] == ["d1", "d2", "d0", "d3", "d4"]
    assert [r.first_stage_rank for r in out] == [2, 3, 1, 4, 5]
    assert [r.rerank_rank for r in out] == [1, 2, 3, None, None]
    assert out[3].rerank_score is None and [r.rank for r in out] == [1, 2, 3, 4, 5]
    assert (out[2].score, out[2].rerank_score) == (pytest.approx(1.0), pytest.approx(0.1)), "both stages' scores"
    plain = merge_results(_hits(4), None, top_k=10)
    assert [r.doc_id for r in plain] == ["d0", "d1", "d2", "d3"], "no reranker: first-stage order"


@pytest.mark.parametrize("override, says", [
    ("serve.embedder.max_ongoing_requests=4", "below max_batch_size"),
    ("serve.embedder.min_replicas=5", "exceeds max_replicas"),
    ("serve.ingress={max_ongoing_requests: 4, target_ongoing_requests: 2}", "ingress.max_ongoing_requests x "
     "max_replicas \\(8\\) is below embedder.max_batch_size \\(16\\)"),
    ("serve.limits.default_top_k=500", "exceeds max_top_k"),
    ("serve.retriever.target_ongoing_requests=1000", "never add a replica"),
])
def test_inconsistent_serve_settings_fail_naming_the_field(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, [override])


def test_serve_config_yaml_is_a_valid_serve_deploy_config():
    """serving/config.yaml works for `serve run` and as a RayService's serveConfigV2: Serve's own schema accepts it,
    its args are a ServeConfig and its import path is the builder."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "serving/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(data)
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app"
    assert ServeConfig.model_validate(app.args).index == "./index"


def test_each_deployment_gets_its_grace_period(tmp_path):
    """serve.<deployment>.graceful_shutdown_timeout_s reaches that deployment's Serve options, and only it (Serve's
    20 s elsewhere). Read from the application graph build_app returns (no Ray)."""
    from serving.app import build_app

    app = build_app(ServeConfig.model_validate({"index": str(tmp_path / "index"),
                                                "retriever": {"graceful_shutdown_timeout_s": 1}}))
    ingress = app._bound_deployment
    bound = [a for arg in ingress.init_args for a in (arg if isinstance(arg, list) else [arg])
             if hasattr(a, "_bound_deployment")]
    grace = {a._bound_deployment.name: a._bound_deployment._deployment_config.graceful_shutdown_timeout_s
             for a in bound} | {ingress.name: ingress._deployment_config.graceful_shutdown_timeout_s}
    assert grace == {"QueryEmbedder": 20.0, "Retriever": 1.0, "Ingress": 20.0}, grace
