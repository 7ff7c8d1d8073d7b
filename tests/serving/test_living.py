"""The endpoint follows its index's versions under client load, without a restart: an admin delete, then a sync that
brings the document back; filters over HTTP (runs after test_app, before test_promotion: see conftest.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ray_vdr.client import EndpointClient, EndpointError
from ray_vdr.config import ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _generation(endpoint: str) -> str:
    return EndpointClient(endpoint).health()[1].generation


def test_deletes_and_syncs_switch_the_endpoint_under_load(endpoint, corpus_index, planted, tiny_qwen):
    from ray_vdr.corpus.embed import run

    victim, query, client = planted[0]["doc_id"], planted[0]["query"], EndpointClient(endpoint)
    assert client.search(query, top_k=1, rerank_depth=0).hits[0].doc_id == victim
    answers: list[tuple[int, str | None, list[str], float]] = []  # status, generation, doc_ids, sent at
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                a = client.search(query, top_k=20, rerank_depth=2)
            except EndpointError as e:
                answers.append((e.status, None, [], sent))
            else:
                answers.append((200, a.generation, [h.doc_id for h in a.hits], sent))

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        before = _generation(endpoint)
        # the admin delete returns once the endpoint serves the new version: no later answer has the page
        deleted = client.delete(doc_ids=[victim])
        assert deleted.documents_removed == 1 and deleted.removed_doc_ids == [victim], deleted
        returned = time.monotonic()
        after = deleted.generation
        assert after != before and after.endswith(f"@v{deleted.version}")
        time.sleep(2)
        later = [a for a in answers if a[3] > returned]  # requests sent after the delete returned
        assert later and all(victim not in a[2] for a in later), "a removed page was served after the switch"
        with pytest.raises(EndpointError) as e:
            client.page_info(victim)
        assert e.value.status == 404, "/pages does not serve a removed page"
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
    with pytest.raises(EndpointError) as e:
        client.delete(doc_ids=["no-such-doc"])
    assert e.value.status == 404 and "nothing to delete" in e.value.detail
    assert ServeConfig().admin_deletes is False


def test_filters_apply_inside_the_search_and_bad_ones_name_the_field(endpoint, planted):
    victim, query, client = planted[0]["doc_id"], planted[1]["query"], EndpointClient(endpoint)
    assert [h.doc_id for h in client.search(query, top_k=5, rerank_depth=0, filter={"doc_id": victim}).hits] == [
        victim]
    info = client.page_info(victim)
    assert info.doc_id == victim and info.metadata == {}
    others = [p["doc_id"] for p in planted[1:4]]
    hits = client.search(query, top_k=10, rerank_depth=0, filter={"doc_id": {"in": others}}).hits
    assert {h.doc_id for h in hits} == set(others)
    assert hits[0].doc_id == planted[1]["doc_id"], "the planted page first among the filtered ones"
    for bad, says in [({"customer": "acme"}, "'customer'"), ({"doc_id": {"near": 1}}, "'near'")]:
        with pytest.raises(EndpointError) as e:
            client.search(query, filter=bad)
        assert e.value.status == 422 and says in e.value.detail, e.value
