"""Talking to the endpoint in the serving tests: small configs sized for 2 CPUs, and HTTP calls that return the
status, headers and body of any answer (4xx and 5xx included)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import urllib.error
import urllib.request

from ray_vdr.config import ServeConfig

TINY = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.2}
LIMITS = {"max_top_k": 20, "max_rerank_depth": 10, "default_rerank_depth": 5, "max_query_chars": 200,
          "max_body_bytes": 3_000_000, "retry_after_s": 3,
          "image": {"max_pixels": 4_000_000, "max_bytes": 2_000_000, "max_side": 2048}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cfg(index, port, **over) -> ServeConfig:
    base = {"index": str(index), "port": port, "limits": LIMITS, "keep_running": False,
            "embedder": {**TINY, "max_batch_size": 8, "max_ongoing_requests": 16, "target_ongoing_requests": 4},
            "retriever": {**TINY, "num_cpus": 0.1, "max_batch_size": 8, "max_ongoing_requests": 16,
                          "target_ongoing_requests": 4},
            "rerank": {**TINY, "max_batch_size": 4, "max_ongoing_requests": 8, "target_ongoing_requests": 4},
            "ingress": {**TINY, "num_cpus": 0.1, "max_ongoing_requests": 64, "target_ongoing_requests": 16}}
    return ServeConfig.model_validate({**base, **over})


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_raw(url: str, data: bytes, content_type="application/json", path: str = "search",
             headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": content_type, **(headers or {})},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, dict(e.headers), json.loads(body)
        except ValueError:
            return e.code, dict(e.headers), {"detail": body.decode(errors="replace")}


def post(url: str, body: dict, path: str = "search", headers: dict | None = None) -> tuple[int, dict, dict]:
    return post_raw(url, json.dumps(body).encode(), path=path, headers=headers)


BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@contextlib.contextmanager
def headless_chromium():
    """Debian's chromium through Playwright (never a downloaded browser), with a fresh temporary profile; skips the
    test where there is none, unless RAY_VDR_REQUIRE_BROWSER=1 (CI), where it fails."""
    import pytest

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if os.environ.get("RAY_VDR_REQUIRE_BROWSER") != "1" and not os.path.exists(chromium):
        pytest.skip("no chromium here (CI installs it and sets RAY_VDR_REQUIRE_BROWSER=1)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
        try:
            yield browser
        finally:
            browser.close()
