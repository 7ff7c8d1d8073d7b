"""The endpoint follows its index's versions under client load, without a restart: an admin delete, then a sync that
brings the document back; filters over HTTP (runs after test_app, before test_promotion: see conftest.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ray_vdr.config import ServeConfig, load_config
from tests.serving.http import get, post

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _generation(endpoint: str) -> str:
    return json.loads(get(endpoint + "healthz")[2])["generation"]


def test_deletes_and_syncs_switch_the_endpoint_under_load(endpoint, corpus_index, planted, tiny_qwen):
    from ray_vdr.corpus.embed import run

    victim, query = planted[0]["doc_id"], planted[0]["query"]
    assert post(endpoint, {"query": query, "top_k": 1, "rerank_depth": 0})[2]["results"][0]["doc_id"] == victim
    answers: list[tuple[int, str | None, list[str], float]] = []  # status, generation, doc_ids, sent at
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            status, _, a = post(endpoint, {"query": query, "top_k": 20, "rerank_depth": 2})
            answers.append((status, a.get("generation"), [r["doc_id"] for r in a.get("results", [])], sent))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        before = _generation(endpoint)
        # the admin delete returns once the endpoint serves the new version: no later answer has the page
        status, _, deleted = post(endpoint, {"doc_ids": [victim]}, "admin/delete")
        assert status == 200 and deleted["documents_removed"] == 1, deleted
        returned = time.monotonic()
        after = deleted["generation"]
        assert after != before and after.endswith(f"@v{deleted['version']}")
        time.sleep(2)
        later = [a for a in answers if a[3] > returned]  # requests sent after the delete returned
        assert later and all(victim not in a[2] for a in later), "a removed page was served after the switch"
        assert get(endpoint + f"pages/{victim}?size=info")[0] == 404, "/pages does not serve a removed page"
        # a sync over the unchanged sources brings it back (its file is still there): another switch
        cfg = load_config(ROOT / "configs/demo.yaml", [
            f"index.model={tiny_qwen}", f"index.sources=[{corpus_index.parent / 'corpus'}]",
            f"index.output={corpus_index}", "index.batch_size=8", "index.dim=32", "synthetic=null",
            "index.cpus_per_actor=0.5", "index.decode_cpus=0.25"])
        synced = run(cfg)
        assert synced.summary.documents["added"] == 1 and synced.summary.pages_embedded == 0, synced.summary
        deadline = time.time() + 60
        while _generation(endpoint) == after:
            assert time.time() < deadline, "the endpoint did not follow the sync"
            time.sleep(0.3)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the switches: {failed[:3]}"
    assert answers[-1][2][0] == victim and len({a[1] for a in answers}) >= 3
    # nothing to delete says so; admin deletes are off unless configured
    assert post(endpoint, {"doc_ids": ["no-such-doc"]}, "admin/delete")[0] == 404
    assert ServeConfig().admin_deletes is False


def test_filters_apply_inside_the_search_and_bad_ones_name_the_field(endpoint, planted):
    victim, query = planted[0]["doc_id"], planted[1]["query"]
    status, _, a = post(endpoint, {"query": query, "top_k": 5, "rerank_depth": 0, "filter": {"doc_id": victim}})
    assert status == 200 and [r["doc_id"] for r in a["results"]] == [victim]
    status, _, info = get(endpoint + f"pages/{victim}?size=info")
    assert status == 200 and json.loads(info)["doc_id"] == victim and json.loads(info)["metadata"] == {}
    others = [p["doc_id"] for p in planted[1:4]]
    status, _, a = post(endpoint, {"query": query, "top_k": 10, "rerank_depth": 0,
                                   "filter": {"doc_id": {"in": others}}})
    assert status == 200 and {r["doc_id"] for r in a["results"]} == set(others)
    assert a["results"][0]["doc_id"] == planted[1]["doc_id"], "the planted page first among the filtered ones"
    status, _, a = post(endpoint, {"query": query, "filter": {"customer": "acme"}})
    assert status == 422 and "'customer'" in a["detail"], a
    status, _, a = post(endpoint, {"query": query, "filter": {"doc_id": {"near": 1}}})
    assert status == 422 and "'near'" in a["detail"], a
