"""A sharded endpoint on a 2-node Ray cluster: the package's cluster (resource ``index_a``) and a worker node this
module starts on loopback (``ray start --address … --block``, resource ``index_b``, stopped by its PID). The index has
3 shards (documents hashed to them by the embedding job); each shard is a Retriever group placed by Ray resources:
shard 0 on the head, shards 1 and 2 on the worker. The ingress fans a query out to every shard and merges by score:
the answer equals brute force over the index's stored vectors, key scopes and filters hold in every shard, one
generation answers each request while a shard is still loading a new version, and a shard with no live replica is
a 503 naming it (or a partial answer, when asked for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pyarrow.compute as pc
import pytest

from tests.ray_cluster import stop_ray_start

BIN = Path(sys.executable).parent
KEYS = {"all": "all-key-0123456789abcdef", "team-a": "a-key-0123456789abcdef", "team-b": "b-key-0123456789abcdef"}
SLOW_SHARD_S = 4  # shard 1 loads each newer version this late (the worker node's RAY_VDR_CHAOS_SLOW_SHARD)


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def worker_node(ray_local):
    """A second Ray node on this machine, joined to the package's cluster: no CPUs (the embedder and the ingress stay
    on the head), resource index_b (the shards placed there need no CPU)."""
    temp = Path(tempfile.mkdtemp(prefix="rvw-"))
    log = temp / "node.log"
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_VDR_CHAOS_SLOW_SHARD": f"1:{SLOW_SHARD_S}"}
    with log.open("w") as fh:
        proc = subprocess.Popen([str(BIN / "ray"), "start", f"--address={ray_local.get_runtime_context().gcs_address}",
                                 "--block", "--num-cpus=0", '--resources={"index_b": 10}', "--disable-usage-stats"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len([n for n in ray_local.nodes() if n["Alive"]]) < 2:
            assert proc.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the worker node did not join:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        node = next(n["NodeID"] for n in ray_local.nodes() if n["Alive"] and "index_b" in n["Resources"])
        yield proc, node
    finally:
        stop_ray_start(proc)


@pytest.fixture(scope="module")
def sharded(endpoint, worker_node, ray_local, tiny_qwen, page_pngs, tmp_path_factory, serve_cfg):
    """12 pages (6 of team-a, 6 of team-b) in a 3-shard index, served as the application "sharded"."""
    from ray import serve

    from ray_vdr.endpoint import endpoint_url
    from serving.app import build_app
    from tests.serving.conftest import tenant_index

    root = tmp_path_factory.mktemp("sharded")
    out = tenant_index(root, page_pngs[:12], tiny_qwen, "index.shards=3")
    keys = root / "keys.json"
    keys.write_text(json.dumps([
        {"name": "all", "key": KEYS["all"], "scopes": ["search", "pages", "embed"]},
        {"name": "team-a", "key": KEYS["team-a"], "scopes": ["search", "pages"], "tenants": ["team-a"]},
        {"name": "team-b", "key": KEYS["team-b"], "scopes": ["search", "pages"], "tenants": ["team-b"]}]))
    cfg = serve_cfg(out, urlparse(endpoint).port, app_name="sharded", route_prefix="/sharded",
                    auth={"keys_file": str(keys)}, index_poll_s=0.5,
                    # the lost shards' replicas never start again: deleting the app waits their grace period
                    retriever={"num_cpus": 0, "shard_timeout_s": 3, "graceful_shutdown_timeout_s": 1,
                               "shard_resources": [{"index_a": 1}, {"index_b": 1}, {"index_b": 1}]})
    serve.run(build_app(cfg), name="sharded", route_prefix="/sharded", blocking=False)
    url, deadline = endpoint_url(cfg), time.time() + 240
    while httpx.get(url + "healthz", timeout=30).status_code != 200:
        assert time.time() < deadline, httpx.get(url + "healthz", timeout=30).text
        time.sleep(0.5)
    yield url, out
    serve.delete("sharded")


def _search(url: str, key: str, **body) -> httpx.Response:
    return httpx.post(url + "search", json={"rerank_depth": 0, **body}, headers=_bearer(key), timeout=60)


@pytest.mark.slow
def test_shards_on_two_nodes_answer_as_one_index(sharded, worker_node):
    from ray_vdr.corpus.store import PageStore, open_index

    url, out = sharded
    _, node_b = worker_node
    health = httpx.get(url + "healthz", timeout=30).json()
    shards = {name: st for name, st in health["stages"].items() if name.startswith("retriever")}
    assert sorted(shards) == ["retriever-0", "retriever-1", "retriever-2"]
    assert [shards[f"retriever-{i}"]["shard"] for i in range(3)] == [0, 1, 2]
    assert shards["retriever-0"]["node"] != node_b and shards["retriever-1"]["node"] == node_b == \
        shards["retriever-2"]["node"], "shard 0 on the head, shards 1 and 2 on the worker node"

    index = open_index(str(out))
    ids = index.ids
    assert len(index.manifest.index_shards) == 3 and all(r.vectors for r in index.manifest.index_shards)
    emb = np.array(PageStore.of(index).get(list(range(ids.num_rows)), "embedding"), np.float32)
    tenant = [json.loads(m)["tenant"] for m in ids.column("metadata").to_pylist()]
    for query in ("revenue by quarter", "table of contents", "signature page"):
        vector = httpx.post(url + "v1/embeddings", json={"input": query, "model": "m", "input_type": "query"},
                            headers=_bearer("all"), timeout=60).json()["data"][0]["embedding"]
        scores = emb @ np.array(vector, np.float32)
        want = [ids.column("doc_id")[int(i)].as_py() for i in np.argsort(-scores)[:12]]
        got = _search(url, "all", query=query, top_k=12).json()
        assert [r["doc_id"] for r in got["results"]] == want, "three shards' merge = exact search over all pages"
        assert np.allclose([r["score"] for r in got["results"]], np.sort(scores)[::-1], atol=1e-4)
        mine = _search(url, "team-a", query=query, top_k=12).json()["results"]
        assert [r["doc_id"] for r in mine] == [d for d in want if tenant[ids.column("doc_id").to_pylist().index(d)]
                                               == "team-a"], "a key's tenant scope holds in every shard"

    # a filter matching pages of one shard only still fills top_k
    one = ids.filter(pc.equal(ids.column("index_shard"), 1)).column("doc_id").to_pylist()
    got = _search(url, "all", query="q", top_k=len(one), filter={"doc_id": {"in": one}}).json()["results"]
    assert sorted(r["doc_id"] for r in got) == sorted(one)
    # a page is found in its shard; another tenant's is not there for this key
    b_page = next(d for d, t in zip(ids.column("doc_id").to_pylist(), tenant, strict=True) if t == "team-b")
    assert httpx.get(url + f"pages/{b_page}", params={"size": "info"}, headers=_bearer("team-b"),
                     timeout=30).json()["doc_id"] == b_page
    assert httpx.get(url + f"pages/{b_page}", headers=_bearer("team-a"), timeout=30).status_code == 404


@pytest.mark.slow
def test_one_generation_per_answer_and_a_lost_shard_is_named(sharded, worker_node):
    """A delete publishes a version that shard 1 loads SLOW_SHARD_S late: meanwhile every answer comes from the
    previous version on every shard (the deleted page still there), then from the new one (gone); never a mix. Then
    the worker node stops: shards 1 and 2 have no live replica: 503 naming them, or a partial answer when asked."""
    from ray_vdr.corpus.store import open_index
    from ray_vdr.corpus.sync import delete

    url, out = sharded
    proc, _ = worker_node
    ids = open_index(str(out)).ids
    in_1 = ids.filter(pc.equal(ids.column("index_shard"), 1)).column("doc_id").to_pylist()
    in_0 = ids.filter(pc.equal(ids.column("index_shard"), 0)).column("doc_id").to_pylist()
    victim, body = in_0[0], {"query": "q", "top_k": 12, "filter": {"doc_id": {"in": [in_0[0], in_1[0]]}}}
    before = _search(url, "all", **body).json()
    assert {r["doc_id"] for r in before["results"]} == {victim, in_1[0]}
    old_gen = before["generation"]
    summary = delete(str(out), doc_ids=[victim])
    assert summary.shards_changed == [0]
    seen, deadline = [], time.time() + 60
    while time.time() < deadline:
        answer = _search(url, "all", **body).json()
        docs = {r["doc_id"] for r in answer["results"]}
        seen.append(answer["generation"])
        assert (victim in docs) == (answer["generation"] == old_gen), (answer["generation"], docs)
        if answer["generation"] != old_gen:
            break
        time.sleep(0.2)
    assert seen[-1] != old_gen and seen.count(old_gen) >= 5, f"the previous version, while shard 1 loaded: {seen}"

    stop_ray_start(proc)
    t0 = time.time()
    lost = _search(url, "all", query="q", top_k=5)
    assert lost.status_code == 503 and "index shards 1, 2 of 3 unavailable" in lost.json()["detail"], lost.text
    assert time.time() - t0 < 30
    partial = _search(url, "all", query="q", top_k=12, allow_partial=True).json()
    assert partial["partial"] is True and partial["missing_shards"] == [1, 2]
    assert {r["doc_id"] for r in partial["results"]} == set(in_0) - {victim}
