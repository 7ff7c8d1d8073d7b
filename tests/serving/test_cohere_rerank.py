"""POST /v2/rerank through the real ``cohere`` client (and /v1/rerank, Jina's path): the scores are the CrossEncoder's
own, for texts, images and indexed pages; bad requests are 4xx naming the field (the shared endpoint)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_cohere_client_gets_the_cross_encoders_scores(endpoint, inproc, planted, page_pngs):
    import cohere
    from PIL import Image

    ce, query = inproc["ce"], planted[0]["query"]
    image = "data:image/png;base64," + base64.b64encode(page_pngs[3]).decode()
    texts = ["Revenue grew 12% in 2021.", "The cafeteria opens at nine."]
    page = planted[0]["doc_id"]
    client = cohere.ClientV2(base_url=endpoint.rstrip("/"), api_key="unused", timeout=60)
    got = client.rerank(model="ray-vdr", query=query, documents=[*texts, image, {"doc_id": page}],  # type: ignore
                        top_n=3)
    want = [float(s) for s in ce.predict([(query, t) for t in texts], convert_to_numpy=True)]
    want.append(float(ce.predict([(query, Image.open(io.BytesIO(page_pngs[3])).convert("RGB"))])[0]))
    want.append(inproc["rerank"](query, [page])[0])
    order = sorted(range(4), key=lambda i: -want[i])[:3]
    assert [r.index for r in got.results] == order
    assert np.allclose([r.relevance_score for r in got.results], [want[i] for i in order], atol=1e-4)
    # Jina's path, the same answer
    jina = httpx.post(endpoint + "v1/rerank", json={"query": query, "documents": texts, "top_n": 1}, timeout=60)
    assert jina.status_code == 200 and jina.json()["results"][0]["index"] == int(np.argmax(want[:2]))


@pytest.mark.parametrize("body,status,says", [
    ({"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n must be positive"),
    ({"query": "", "documents": ["a"]}, 400, "query is empty"),
    ({"query": "q", "documents": []}, 400, "documents is empty"),
    ({"query": "q", "documents": [{"image": "https://example.com/a.png"}]}, 400, "never fetches"),
    ({"query": "q", "documents": [{"doc_id": "no-such.png"}]}, 404, "no page 1 of doc_id 'no-such.png'"),
    ({"query": "q", "documents": ["x"] * 11}, 400, "the limit is 10"),
])
def test_bad_rerank_requests_name_the_field(endpoint, body, status, says):
    got = httpx.post(endpoint + "v2/rerank", json=body, timeout=60)  # as sent (the cohere client checks some itself)
    assert got.status_code == status and says in got.json()["detail"], got.text
