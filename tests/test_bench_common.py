"""bench/common.py: the serving benches' HTTP (through the library's client, against a stub endpoint on loopback) and
their percentiles."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import common
from ray_vdr.client import EndpointClient

TIMINGS = {**dict.fromkeys(("embed_ms", "search_ms", "rerank_ms", "embed_compute_ms", "search_compute_ms",
                            "rerank_compute_ms", "embed_batch", "rerank_batch"), 0), "total_ms": 1.5}
ANSWER = {"query": "q", "image_query": False, "top_k": 10, "generation": "g-1", "rerank_depth": 0, "results": [],
          "timings": TIMINGS}  # a SearchResponse (ray_vdr.protocol) with no hits


class StubEndpoint(BaseHTTPRequestHandler):
    """POST /<app>/search: 503 with Retry-After for the query "busy", else an empty answer with the ingress's timings;
    the paths in the order they came."""

    seen: list[str] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(self.path)
        busy = body["query"] == "busy"
        raw = json.dumps({"detail": "over capacity"} if busy else ANSWER).encode()
        self.send_response(503 if busy else 200)
        if busy:
            self.send_header("Retry-After", "3")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_search_reply_carries_its_status_timings_and_retry_after(stub):
    ok = common.timed_search(EndpointClient(stub + "/a/"), "revenue", rerank_depth=0)
    assert ok.status == 200 and ok.timings == TIMINGS and ok.ms > 0 and ok.retry_after is None
    busy = common.timed_search(EndpointClient(stub + "/a/"), "busy", rerank_depth=0)
    assert (busy.status, busy.timings, busy.retry_after) == (503, {}, "3")


def test_the_closed_loop_alternates_between_applications_and_fails_on_errors_when_strict(stub):
    apps = {n: EndpointClient(f"{stub}/{n}/") for n in ("a", "b")}
    StubEndpoint.seen.clear()
    replies, seconds = common.closed_loop(apps, ["q0", "q1"], clients=1, requests=3, rerank_depth=0)
    assert StubEndpoint.seen == ["/a/search", "/b/search", "/b/search", "/a/search", "/a/search", "/b/search"]
    assert {n: [r.status for r in rs] for n, rs in replies.items()} == {"a": [200] * 3, "b": [200] * 3}
    assert seconds > 0
    with pytest.raises(RuntimeError, match="503"):
        common.closed_loop(apps, ["busy"], clients=2, requests=2, rerank_depth=0, strict=True)


def test_percentiles_are_numpys_and_nan_without_values():
    assert common.p50_p99([1.0, 2.0, 3.0, 4.0], "x_") == {"x_p50_ms": 2.5, "x_p99_ms": pytest.approx(3.97)}
    assert math.isnan(common.percentile([], 50))
