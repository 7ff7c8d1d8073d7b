"""A multi-vector endpoint: a third application on the package's cluster over a late-interaction index (the tiny
multi-vector Qwen3-VL's pooled token vectors, an FDE first stage, exact MaxSim), of two tenants, with the reranker.
Search answers MaxSim as computed without the endpoint's code (Sentence Transformers' own encode_query and the
token vectors the job stored), each tenant sees its own pages only, the reranker reorders the head, and
``/v1/embeddings`` gives token vectors when asked (and says how to ask); a sync's new page is served and a deleted
page is gone, as the endpoint follows the index's versions."""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_vdr.client import EndpointClient, EndpointError

KEYS = {"team-a": "a-key-late-0123456789", "team-b": "b-key-late-0123456789", "embed": "e-key-late-0123456789",
        "admin": "x-key-late-0123456789"}
LATE = ["index.late.pooling=2", "index.late.k_sim=3", "index.late.d_proj=8", "index.late.reps=4"]


@pytest.fixture(scope="module")
def late(endpoint, tiny_colqwen, tiny_reranker, page_pngs, tmp_path_factory, serve_cfg):
    from ray import serve

    from ray_vdr.endpoint import endpoint_url
    from serving.app import build_app
    from tests.serving.conftest import tenant_index

    root = tmp_path_factory.mktemp("late")
    out = tenant_index(root, page_pngs[:12], tiny_colqwen, *LATE)
    keys = root / "keys.json"
    keys.write_text(json.dumps([
        {"name": "team-a", "key": KEYS["team-a"], "scopes": ["search", "pages"], "tenants": ["team-a"]},
        {"name": "team-b", "key": KEYS["team-b"], "scopes": ["search", "pages"], "tenants": ["team-b"]},
        {"name": "embed", "key": KEYS["embed"], "scopes": ["embed"]},
        {"name": "admin", "key": KEYS["admin"], "scopes": ["admin"]}]))
    cfg = serve_cfg(out, urlparse(endpoint).port, app_name="late", route_prefix="/late", index_poll_s=0.5,
                    admin_deletes=True, auth={"keys_file": str(keys)}, reranker=str(tiny_reranker))
    serve.run(build_app(cfg), name="late", route_prefix="/late", blocking=False)
    url, deadline = endpoint_url(cfg), time.time() + 240
    while EndpointClient(url).health()[0] != 200:
        assert time.time() < deadline, EndpointClient(url).health()
        time.sleep(0.5)
    yield url, out, root
    serve.delete("late")


def _reference(tiny_colqwen, out):
    """MaxSim by hand: Sentence Transformers' MultiVectorEncoder (its saved prompts, 32-d unit tokens) against the
    token vectors the job stored, by doc_id."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    from ray_vdr.corpus.late import unpack_tokens

    model = MultiVectorEncoder(str(tiny_colqwen), device="cpu")
    pages = pq.read_table(out / "pages", columns=["doc_id", "tokens"])
    tokens = {d: unpack_tokens(b, 32, "fp16") for d, b in zip(pages.column("doc_id").to_pylist(),
                                                             pages.column("tokens").to_pylist(), strict=True)}

    def scores(query: str) -> dict[str, float]:
        q = model.encode_query([query], convert_to_numpy=True)[0]
        return {d: float((q @ t.T).max(axis=1).sum()) for d, t in tokens.items()}

    return model, tokens, scores


@pytest.mark.slow
def test_multi_vector_search_tenants_reranker_and_token_embeddings(late, tiny_colqwen, page_pngs):
    import openai

    url, out, _ = late
    model, tokens, scores = _reference(tiny_colqwen, out)
    assert all(0 < len(t) <= 25 for t in tokens.values()), "pages stored pooled (48 tokens -> about half)"
    team_a, team_b = (EndpointClient(url, api_key=KEYS[n]) for n in ("team-a", "team-b"))

    # MaxSim of every page the tenant may see, in order, as computed by hand
    query = "revenue by quarter"
    want = scores(query)
    hits = team_a.search(query, top_k=10, rerank_depth=0).hits
    assert {h.doc_id for h in hits} == {d for d in want if d.startswith("a-")}, "team-a's six pages, only those"
    for h in hits:
        assert h.score == pytest.approx(want[h.doc_id], abs=2e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {h.doc_id[0] for h in team_b.search(query, top_k=10, rerank_depth=0).hits} == {"b"}

    # a page's own image finds it first (its tokens are its best match); another tenant's key cannot find it
    assert team_a.search(image=page_pngs[2], top_k=3, rerank_depth=0).hits[0].doc_id == "a-2.png"
    assert "a-2.png" not in {h.doc_id for h in team_b.search(image=page_pngs[2], top_k=10, rerank_depth=0).hits}

    # the reranker reorders the MaxSim head
    reranked = team_a.search(query, top_k=6, rerank_depth=4)
    head = [h for h in reranked.hits if h.rerank_score is not None]
    assert reranked.rerank_depth == 4 and len(head) == 4
    assert [h.rerank_score for h in head] == sorted((h.rerank_score for h in head), reverse=True)
    assert {h.doc_id for h in head} == {h.doc_id for h in hits[:4]}

    # /v1/embeddings: token vectors when asked, as the index encodes queries; a plain request says how to ask
    client = openai.OpenAI(base_url=url + "v1", api_key=KEYS["embed"], max_retries=0)
    with pytest.raises(openai.BadRequestError, match="token_vectors: true"):
        client.embeddings.create(model="x", input=query)
    got = client.embeddings.create(model="x", input=[query, "margin"], extra_body={"token_vectors": True}).data
    ref = model.encode_query([query, "margin"], convert_to_numpy=True)
    for d, r in zip(got, ref, strict=True):  # the openai client decodes base64 into one flat list
        assert d.tokens == len(r)
        np.testing.assert_allclose(np.reshape(d.embedding, (d.tokens, 32)), r, atol=1e-4)
    vectors = EndpointClient(url, api_key=KEYS["embed"]).embed([query], token_vectors=True)
    np.testing.assert_allclose(vectors[0], ref[0], atol=1e-4)
    with pytest.raises(EndpointError, match="token_vectors"):
        EndpointClient(url, api_key=KEYS["embed"]).embed([query])


@pytest.mark.slow
def test_a_living_multi_vector_index_serves_its_new_pages_and_not_its_deleted_ones(late, tiny_colqwen, page_pngs):
    from tests.serving.conftest import tenant_index

    url, _, root = late
    team_a = EndpointClient(url, api_key=KEYS["team-a"])
    before = team_a.search(image=page_pngs[12], top_k=10, rerank_depth=0)
    tenant_index(root, page_pngs[:14], tiny_colqwen, *LATE)  # a sync: a-12.png and b-13.png added, a new version
    deadline = time.time() + 60
    while (hits := team_a.search(image=page_pngs[12], top_k=10, rerank_depth=0)).generation == before.generation:
        assert time.time() < deadline, "the endpoint did not load the synced version"
        time.sleep(0.5)
    assert hits.hits[0].doc_id == "a-12.png" and len(hits.hits) == 7, "the new page first, among team-a's seven"
    EndpointClient(url, api_key=KEYS["admin"]).delete(doc_ids=["a-12.png"])  # returns once it is no longer served
    assert "a-12.png" not in {h.doc_id for h in team_a.search(image=page_pngs[12], top_k=10, rerank_depth=0).hits}
