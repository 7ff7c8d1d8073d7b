"""`ray-vdr promote` on the running endpoint under client load (the last serving module: it switches the shared
endpoint to another model; see conftest.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_vdr.client import EndpointClient, EndpointError
from ray_vdr.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_promotion_switches_the_endpoint_under_load(endpoint, corpus_index, tiny_qwen, synthetic, tmp_path):
    """`ray-vdr promote` on the running endpoint while clients keep searching: a candidate embedder (other random
    weights) re-embeds the corpus into a new index, both are evaluated on the eval split, it goes live (the test
    lowers the bar with min_delta=-1: both models are random, so neither is better), and the endpoint switches with
    no failed request; afterwards it answers from the new index, as brute force over that index says. A candidate
    below the bar is then rejected and recorded, and the endpoint keeps serving the live generation."""
    from sentence_transformers import SentenceTransformer

    from ray_vdr.corpus.live import base_id, generation
    from ray_vdr.models.builders import build_qwen3vl_embedder
    from ray_vdr.models.processor import install_image_only_processor
    from ray_vdr.promote import run

    syn, _ = synthetic
    candidate = build_qwen3vl_embedder(tmp_path / "candidate", max_pixels=64 * 64, seed=1)
    live_json = corpus_index.parent / "live.json"
    base = ["index.batch_size=8", "index.dim=32", "index.cpus_per_actor=0.5", "index.decode_cpus=0.25",
            "synthetic=null",
            f"data.eval.uri={syn.output_dir}/eval", f"serve.index={corpus_index}", f"serve.live={live_json}",
            f"promote.output={tmp_path}/generations", f"promote.endpoint={endpoint}", "promote.eval_cpus=0.5",
            "promote.switch_timeout_s=120", f"run.storage_path={tmp_path}/runs"]
    queries = ["What was the revenue in 2021?", "operating margin by quarter", "headcount 2019"]
    answers: list[tuple[int, str | None, str]] = []  # status, generation, error
    stop = threading.Event()
    client = EndpointClient(endpoint)

    def search(n: int) -> None:
        i = n
        while not stop.is_set():
            try:
                answer = client.search(queries[i % len(queries)], top_k=3, rerank_depth=2)
            except EndpointError as e:
                answers.append((e.status, None, e.detail))
            else:
                answers.append((200, base_id(answer.generation), ""))
            i += 1

    clients = [threading.Thread(target=search, args=(n,)) for n in range(2)]
    for t in clients:
        t.start()
    try:
        result = run(load_config(ROOT / "configs/demo.yaml", [*base, f"promote.model={candidate}",
                                                              "promote.min_delta=-1.0"]))
        time.sleep(3)  # and a little more load on the new generation
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=120)
    old, new = generation(str(corpus_index)).id, result.candidate.id
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the switch: {failed[:5]}"
    seen = [g for _, g, _ in answers]
    print(f"promotion under load: {len(answers)} requests, {seen.count(old)} from {old}, {seen.count(new)} from {new}")
    assert result.promoted and result.switched and old in seen and new in seen, (result, seen)
    assert seen[-4:] == [new] * 4, seen[-10:]

    # the live manifest says what is live, and what was
    doc = json.loads(live_json.read_text())
    assert doc["live"]["id"] == new and doc["live"]["model"] == str(candidate)
    assert doc["live"]["index"] == result.candidate.index and doc["previous"]["id"] == old
    assert doc["history"][-1]["decision"] == "promoted" and "ndcg@10" in doc["history"][-1]["candidate"]["metrics"]
    status, health = client.health()
    assert status == 200 and health.ready and base_id(health.generation) == new

    # answers come from the new index: the candidate's brute-force top 3 over the vectors its index stored
    install_image_only_processor()
    st = SentenceTransformer(str(candidate), device="cpu")
    pages = pq.read_table(Path(result.candidate.index) / "pages", columns=["doc_id", "embedding"])
    emb = np.stack(pages.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    v = st.encode_query([queries[0]], truncate_dim=32, normalize_embeddings=True, convert_to_numpy=True)[0]
    top = np.argsort(-(emb @ v))[:3]
    answer = client.search(queries[0], top_k=3, rerank_depth=0)
    assert base_id(answer.generation) == new
    assert [h.doc_id for h in answer.hits] == [pages.column("doc_id")[int(i)].as_py() for i in top]
    assert np.allclose([h.score for h in answer.hits], emb[top] @ v, atol=1e-4)

    # a candidate below the bar is rejected and recorded; the live generation stays
    rejected = run(load_config(ROOT / "configs/demo.yaml", [*base, f"promote.model={tiny_qwen}",
                                                            "promote.min_delta=1.0"]))
    assert not rejected.promoted and rejected.live.id == new and rejected.switched is None
    doc = json.loads(live_json.read_text())
    assert doc["live"]["id"] == new and doc["history"][-1]["decision"] == "rejected"
    assert doc["history"][-1]["candidate"]["model"] == str(tiny_qwen)
    assert base_id(client.search(queries[1], top_k=3).generation) == new
    # the live model again: nothing is embedded, evaluated or written
    again = run(load_config(ROOT / "configs/demo.yaml", [*base, f"promote.model={candidate}"]))
    assert not again.promoted and "already live" in again.reason and again.metrics == {}
    assert json.loads(live_json.read_text()) == doc
