"""POST /v1/embeddings through the real ``openai`` client: the vectors are Sentence Transformers' own
``encode_query`` / ``encode_document`` at the asked dimension, in both encodings; bad requests are 4xx naming the field
(the shared endpoint; see conftest.py)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _client(endpoint: str):
    from openai import OpenAI

    return OpenAI(base_url=endpoint + "v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_gets_the_models_own_vectors(endpoint, inproc, page_pngs):
    from PIL import Image

    st = inproc["st"]
    client = _client(endpoint)
    texts = ["What was the revenue in 2021?", "operating margin by quarter"]
    for dim in (32, 64):
        got = client.embeddings.create(model="ray-vdr", input=texts, dimensions=dim)  # the client asks for base64
        want = st.encode_query(texts, truncate_dim=dim, normalize_embeddings=True, convert_to_numpy=True)
        assert [d.index for d in got.data] == [0, 1] and len(got.data[0].embedding) == dim
        assert np.allclose(np.array([d.embedding for d in got.data]), want, atol=2e-5)
        assert got.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="ray-vdr", input=texts[0], encoding_format="float",
                                      extra_body={"input_type": "document"})
    want = st.encode_document([texts[0]], truncate_dim=32, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(floats.data[0].embedding, want[0], atol=2e-5), "the document prompt, at the index's dim"

    # an image as an OpenAI content part (a data URL): the model's own document-side image encoding
    png = page_pngs[0]
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
    got = client.embeddings.create(model="ray-vdr", input=[part], dimensions=32,  # type: ignore[list-item]
                                   extra_body={"input_type": "document"})
    image = Image.open(io.BytesIO(png)).convert("RGB")
    want = st.encode_document([image], truncate_dim=32, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(got.data[0].embedding, want[0], atol=1e-4)
    # an input that is a list of ONE content part (a message's content) is that part, not a mix
    one = client.embeddings.create(model="ray-vdr", input=[[part], texts[0]], dimensions=32,  # type: ignore[list-item]
                                   extra_body={"input_type": "document"})
    assert np.allclose(one.data[0].embedding, want[0], atol=1e-4) and len(one.data) == 2


def test_bad_embedding_requests_name_the_field(endpoint):
    import openai

    client = _client(endpoint)
    for kwargs, says in [({"input": ["x"], "dimensions": 0}, "dimensions must be one of"),
                         ({"input": ["x"], "dimensions": 100_000}, "dimensions must be one of"),
                         ({"input": [[1, 2, 3]]}, "token arrays"),
                         ({"input": [""]}, "input[0] is empty"),
                         ({"input": ["q", [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {
                             "url": "data:image/png;base64,AAAA"}}]]}, "input[1] mixes 2 content parts"),
                         ({"input": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
                          "never fetches")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(says)) as e:
            client.embeddings.create(model="ray-vdr", **kwargs)
        assert e.value.status_code == 400
