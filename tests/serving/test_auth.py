"""API keys and tenants: the key ring's checks (no Ray), and a second application on the shared Serve instance, with
keys, over an index of two tenants' pages: every route refuses a missing, malformed or unknown key, a key without
the scope, and another tenant's pages, which it cannot widen with a filter; the keys never reach the logs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from ray_vdr.client import EndpointClient, EndpointError
from serving.auth import AuthError, KeyRing

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"team-a": "a-key-0123456789abcdef", "team-b": "b-key-0123456789abcdef", "embed": "e-key-0123456789abcdef",
        "admin-a": "x-key-0123456789abcdef"}


def _ring(tmp_path, entries) -> KeyRing:
    f = tmp_path / "keys.json"
    f.write_text(json.dumps(entries))
    return KeyRing.load(str(f), None)


def test_key_ring_checks_and_refusals(tmp_path, monkeypatch):
    ring = _ring(tmp_path, [{"name": "a", "key": KEYS["team-a"], "scopes": ["search"], "tenants": ["team-a"]}])
    assert ring.check(f"Bearer {KEYS['team-a']}", "search").scope() == [("tenant", ["team-a"])]
    for header, status, says in [(None, 401, "needs an API key"), ("Basic abc", 401, "malformed"),
                                 ("Bearer", 401, "malformed"), ("Bearer nope-nope-nope-nope", 401, "invalid API key")]:
        with pytest.raises(AuthError, match=says) as e:
            ring.check(header, "search")
        assert e.value.status == status
    with pytest.raises(AuthError, match="'pages' scope") as e:
        ring.check(f"Bearer {KEYS['team-a']}", "pages")
    assert e.value.status == 403
    for entries, says in [([{"key": KEYS["team-a"], "scopes": ["search", "read"]}], "unknown scope 'read'"),
                          ([{"key": "short", "scopes": ["search"]}], "at least 16"),
                          ([{"key": KEYS["team-a"], "scopes": ["search"], "teams": []}], "unknown fields"),
                          ([], "non-empty JSON list")]:
        with pytest.raises(ValueError, match=says):
            _ring(tmp_path, entries)
    monkeypatch.setenv("RVDR_KEYS", json.dumps([{"sha256": "ab" * 32, "scopes": ["embed"]}]))
    assert KeyRing.load(None, "RVDR_KEYS").enabled
    with pytest.raises(ValueError, match="RVDR_UNSET is not set"):
        KeyRing.load(None, "RVDR_UNSET")


def test_a_reachable_endpoint_needs_keys_or_an_explicit_anonymous(corpus_index, serve_cfg):
    from serving.app import build_app

    with pytest.raises(ValueError, match="serve.auth has no keys"):
        build_app(serve_cfg(corpus_index, 8000, host="0.0.0.0"))


@pytest.fixture(scope="module")
def secure(endpoint, ray_local, tiny_qwen, tiny_reranker, page_pngs, tmp_path_factory, serve_cfg):
    """The second application: 8 pages, 4 of tenant team-a and 4 of team-b (sidecars), keys from a file."""
    from ray import serve

    from ray_vdr.endpoint import endpoint_url
    from serving.app import build_app
    from tests.serving.conftest import tenant_index

    root = tmp_path_factory.mktemp("tenants")
    out = tenant_index(root, page_pngs[:8], tiny_qwen)
    keys = root / "keys.json"
    keys.write_text(json.dumps([
        {"name": "team-a", "key": KEYS["team-a"], "scopes": ["search", "pages", "rerank"], "tenants": ["team-a"]},
        {"name": "team-b", "key": KEYS["team-b"], "scopes": ["search", "pages", "rerank"], "tenants": ["team-b"]},
        {"name": "embed-only", "key": KEYS["embed"], "scopes": ["embed"]},
        {"name": "admin-a", "key": KEYS["admin-a"], "scopes": ["admin"], "tenants": ["team-a"]}]))
    cfg = serve_cfg(out, urlparse(endpoint).port, app_name="secure", route_prefix="/secure",
                    auth={"keys_file": str(keys)}, admin_deletes=True, reranker=str(tiny_reranker))
    serve.run(build_app(cfg), name="secure", route_prefix="/secure", blocking=False)
    url, seen, deadline = endpoint_url(cfg), [], time.time() + 240
    while EndpointClient(url).health()[0] != 200:  # while it loads, a search is a 503 "not ready" (in the metrics)
        assert time.time() < deadline, EndpointClient(url).health()
        status = httpx.post(url + "search", json={"query": "q"}, headers=_bearer("team-a"), timeout=60).status_code
        seen += [status] if status != 404 else []  # 404: the proxy does not know the route yet
        time.sleep(0.2)
    assert 503 in seen, f"the search while loading answered {seen}"
    yield url
    serve.delete("secure")


@pytest.fixture
def http(secure):
    """Raw HTTP to the keyed application: exact statuses and headers, and requests the typed client never sends."""
    with httpx.Client(base_url=secure, timeout=60) as client:
        yield client


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.mark.slow
def test_keys_scopes_and_tenants_on_every_route(secure, http, page_pngs, tmp_path_factory):
    import openai

    q = {"query": "revenue by quarter", "top_k": 10, "rerank_depth": 0}
    for path, body in [("search", q), ("v2/rerank", {"query": "q", "documents": ["a"]}),
                       ("v1/embeddings", {"input": "q"})]:
        assert http.post(path, json=body).status_code == 401, path
        assert http.post(path, json=body, headers={"Authorization": "Token abc"}).status_code == 401, path
    assert http.get("pages/a-0.png").status_code == 401
    assert http.post("search", json=q, headers=_bearer("embed")).status_code == 403, "an embed-only key cannot search"

    # each tenant sees its own pages only, and a filter cannot widen that
    team_a, team_b = (EndpointClient(secure, api_key=KEYS[name]) for name in ("team-a", "team-b"))
    hits = team_a.search("revenue by quarter", top_k=10, rerank_depth=0).hits
    assert len(hits) == 4 and {h.doc_id[0] for h in hits} == {"a"} and hits[0].rank == 1
    assert team_a.search("revenue by quarter", top_k=10, rerank_depth=0, filter={"tenant": "team-b"}).hits == []
    assert {h.doc_id[0] for h in team_b.search("revenue by quarter", top_k=10, rerank_depth=0).hits} == {"b"}
    # a tenant's page is the caller's: no shared cache (a proxy, a CDN) may keep it for another key
    for size in ("thumbnail", "full", "info"):
        answer = http.get("pages/a-0.png", params={"size": size}, headers=_bearer("team-a"))
        assert answer.status_code == 200, (size, answer.text)
        assert answer.headers["cache-control"] == "private, max-age=3600", (size, answer.headers)
        assert answer.headers["vary"] == "Authorization", (size, answer.headers)
    # another tenant's page is a 404, as a missing one: through /pages and rerank references
    for call, says in [(lambda: team_a.page("b-1.png"), "b-1.png"), (lambda: team_a.page("no-such.png"), "no-such"),
                       (lambda: team_a.rerank("q", [{"doc_id": "b-1.png"}]), "no page 1 of doc_id 'b-1.png'"),
                       # a tenant-scoped admin cannot delete another tenant's documents
                       (lambda: EndpointClient(secure, api_key=KEYS["admin-a"]).delete(filter={"tenant": "team-b"}),
                        "nothing to delete")]:
        with pytest.raises(EndpointError) as e:
            call()
        assert e.value.status == 404 and says in e.value.detail and e.value.request_id
    # the openai client with an embed key
    client = openai.OpenAI(base_url=secure + "v1", api_key=KEYS["embed"], max_retries=0)
    assert len(client.embeddings.create(model="x", input="q").data[0].embedding) == 32
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secure + "v1", api_key="wrong-key-0123456789", max_retries=0).embeddings.create(
            model="x", input="q")

    # the typed client with a tenant's key: the rest of what it offers, and its errors
    assert KEYS["team-a"] not in repr(team_a)
    info = team_a.page_info(hits[0].doc_id)
    assert info.doc_id == hits[0].doc_id and info.metadata == {"tenant": "team-a"}
    assert team_a.page(hits[0].doc_id, size="full")[:4] == b"\x89PNG"
    ranked = team_a.rerank("revenue", ["a text", {"doc_id": hits[0].doc_id, "page": hits[0].page}], top_n=2)
    assert sorted(r.index for r in ranked) == [0, 1] and ranked[0].relevance_score >= ranked[1].relevance_score
    for call, status, says in [(lambda: team_a.embed("q"), 403, "does not have the 'embed' scope"),  # OpenAI's shape
                               (lambda: EndpointClient(secure, api_key="wrong-key-0123456789").search("q"), 401,
                                "invalid API key")]:
        with pytest.raises(EndpointError) as e:
            call()
        assert e.value.status == status and e.value.detail.endswith(says) and e.value.request_id
    vectors = EndpointClient(secure, api_key=KEYS["embed"]).embed(["q", page_pngs[0]], dimensions=32)
    assert [len(v) for v in vectors] == [32, 32]

    # no key, nor its hash, in any log of the cluster
    logs = [p for p in tmp_path_factory.getbasetemp().rglob("*") if p.is_file() and "logs" in p.parts]
    assert logs
    for p in logs:
        text = p.read_bytes()
        for key in KEYS.values():
            assert key.encode() not in text, f"a key is in {p}"


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of Ray's Prometheus export: (sample name, labels) → value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.mark.slow
def test_metrics_count_known_traffic_and_logs_carry_request_ids(secure, http, metrics_url, tmp_path_factory):
    """After known traffic to the keyed application, the scrape's counts move by exactly that traffic; every name the
    Grafana dashboard queries is in the scrape; each response's x-request-id is in its access-log line, and health
    probes are not."""
    import uuid

    from serving.metrics import EXPORTED, SERVE_METRICS
    from tests.k8s.manifests import dashboard, dashboard_metrics

    app = {"application": "secure"}

    def cumulative(samples):  # this application's counters and histogram counts (not its gauges)
        return {k: v for k, v in samples.items() if k[0].startswith("ray_vdr_") and ("application", "secure") in k[1]
                and k[0].endswith(("_total", "_count", "_bucket"))}

    deadline, before = time.time() + 30, _scrape(metrics_url)
    while time.time() < deadline:  # what the earlier test sent may still be on its way from any replica (every 1 s)
        time.sleep(2.5)
        now = _scrape(metrics_url)
        if cumulative(now) == cumulative(before):
            break
        before = now

    q = {"query": "revenue by quarter", "top_k": 3, "rerank_depth": 0}
    rid = f"test-{uuid.uuid4()}"
    answer = http.post("search", json=q, headers={**_bearer("team-a"), "x-request-id": rid})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == rid
    generated = [EndpointClient(secure, api_key=KEYS["team-a"]).search(**q).request_id for _ in range(2)]
    assert all(generated) and rid not in generated
    assert http.post("search", json=q).status_code == 401
    assert http.post("search", json=q, headers={"Authorization": "Bearer x"}).status_code == 401
    assert http.post("search", json=q, headers=_bearer("embed")).status_code == 403
    assert http.get("pages/b-1.png", headers=_bearer("team-a")).status_code == 404
    assert http.post("v1/embeddings", json={"input": ["a", "b"]}, headers=_bearer("embed")).status_code == 200
    assert all(http.get("healthz").status_code == 200 for _ in range(2))

    expected = {("ray_vdr_requests_total", ("route", "/search"), ("status", "200")): 3,
                ("ray_vdr_requests_total", ("route", "/search"), ("status", "401")): 2,
                ("ray_vdr_requests_total", ("route", "/search"), ("status", "403")): 1,
                ("ray_vdr_requests_total", ("route", "/pages/{doc_id:path}"), ("status", "404")): 1,
                ("ray_vdr_requests_total", ("route", "/v1/embeddings"), ("status", "200")): 1,
                ("ray_vdr_requests_total", ("route", "/healthz"), ("status", "200")): 2,
                ("ray_vdr_stage_latency_ms_count", ("route", "/search"), ("stage", "total")): 3,
                ("ray_vdr_stage_latency_ms_count", ("route", "/search"), ("stage", "embed")): 3,
                ("ray_vdr_stage_latency_ms_count", ("route", "/search"), ("stage", "rerank")): 0,
                ("ray_vdr_stage_latency_ms_count", ("route", "/v1/embeddings"), ("stage", "embed")): 1,
                # one search at a time: each in a batch of its own (Ray exports a histogram's _sum at its buckets'
                # midpoints, so counts are what a test can check exactly)
                ("ray_vdr_batch_size_count", ("stage", "embed")): 3,
                ("ray_vdr_batch_size_bucket", ("stage", "embed"), ("le", "1.0")): 3,
                ("ray_vdr_batch_size_count", ("stage", "search")): 3}

    def deltas(samples):
        return {k: _total(samples, k[0], **app, **dict(k[1:])) - _total(before, k[0], **app, **dict(k[1:]))
                for k in expected}

    deadline, families = time.time() + 30, set()
    while time.time() < deadline:
        after = _scrape(metrics_url)
        families |= {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n, _ in after}
        got = deltas(after)
        if all(got[k] >= v for k, v in expected.items()) and _total(after, "ray_vdr_index_vectors", **app):
            break
        time.sleep(1)
    time.sleep(2)  # nothing more arrives: the counts are exact, not at least
    after = _scrape(metrics_url)
    assert deltas(after) == expected
    # the 503s of the loading test (secure fixture): each counted by route and status, and by reason
    not_ready = _total(after, "ray_vdr_unavailable_total", **app, reason="not_ready")
    assert not_ready >= 1 and not_ready == _total(after, "ray_vdr_requests_total", **app, route="/search", status="503")

    def generation(samples):  # the gauges (re-recorded every second; a busy machine can miss one export)
        live = {dict(ls)["generation"]: v for (n, ls), v in samples.items()
                if n == "ray_vdr_generation_live" and ("application", "secure") in ls}
        return live, [_total(samples, f"ray_vdr_index_{g}", **app) for g in ("vectors", "live_pages", "age_seconds")]

    deadline = time.time() + 20
    while (gauges := generation(after))[0] != {answer.json()["generation"]: 1.0} and time.time() < deadline:
        time.sleep(1)
        after = _scrape(metrics_url)
        families |= {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n, _ in after}
    live, (vectors, pages, age) = gauges
    assert live == {answer.json()["generation"]: 1.0}
    assert vectors == 8 == pages and 0 <= age < 3600

    # every name the dashboard queries was exported (gauges only while recorded: collected over the scrapes above,
    # and more while one is still missing: Serve's proxy gauges come with its own report period)
    deadline = time.time() + 20
    while (set(EXPORTED) | set(SERVE_METRICS)) - families and time.time() < deadline:
        http.get("healthz")
        time.sleep(1)
        families |= {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n, _ in _scrape(
            metrics_url)}
    assert set(EXPORTED) - families == set() and set(SERVE_METRICS) - families == set()
    assert dashboard_metrics(dashboard()) - families == set(), "the Grafana dashboard queries a metric not exported"

    # the ingress's access log: one line per request with its x-request-id; no health probe, at any stage
    base = tmp_path_factory.getbasetemp()
    deadline = time.time() + 15
    while time.time() < deadline:
        ingress = "".join(p.read_text() for p in base.rglob("replica_secure_Ingress_*.log"))
        if all(r in ingress for r in (rid, *generated)):
            break
        time.sleep(0.5)
    lines = ingress.splitlines()
    for r in (rid, *generated):
        assert [ln for ln in lines if r in ln and "POST /secure/search 200" in ln], f"no access-log line with {r}"
    stages = "".join(p.read_text() for p in base.rglob("replica_secure_*.log"))
    assert not [ln for ln in lines if "healthz" in ln] and "CALL status" not in stages
    assert not any(key in stages for key in KEYS.values())


@pytest.mark.slow
def test_search_page_asks_for_a_key_and_shows_the_tenants_pages(browser, secure):
    """In headless chromium: the keyed endpoint's search page answers 401 and shows the key field; with team-a's
    key it shows team-a's pages only, thumbnails included (fetched with the key)."""
    page = browser.new_page()
    page.goto(secure)
    assert not page.is_visible("#api_key")
    page.fill("#query", "revenue by quarter")
    page.click("#go")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "401" in page.inner_text("#status") and page.is_visible("#api_key")
    page.fill("#api_key", KEYS["team-a"])
    page.click("#go")
    page.wait_for_selector("#results .result", timeout=60_000)
    ids = page.eval_on_selector_all("#results .result", "els => els.map(e => e.dataset.docId)")
    assert ids and {d[0] for d in ids} == {"a"}
    page.wait_for_function("document.querySelector('#results img').naturalWidth > 0", timeout=30_000)
