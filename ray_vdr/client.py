"""A small HTTP client of the retrieval endpoint (``serving/``): search, health. The CLI, promotion, tests and
benches talk to the endpoint through it, over HTTP like any other client (standard library only, no Ray)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

__all__ = ["EndpointClient"]


class EndpointClient:
    """The endpoint mounted at ``url`` (e.g. ``http://127.0.0.1:8000/``)."""

    def __init__(self, url: str, timeout: float = 60.0, api_key: str | None = None):
        self.url = url.rstrip("/") + "/"
        self.timeout = timeout
        # the endpoint's API key (serving/auth.py): given, or RAY_VDR_API_KEY (k8s: from the ray-vdr-api-keys Secret)
        self._key = api_key or os.environ.get("RAY_VDR_API_KEY") or None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"detail": text}

    def search(self, body: dict[str, Any], timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        """``POST /search``: (HTTP status, JSON answer); 4xx and 5xx come back as their status and detail."""
        return self._call("POST", "search", body, timeout)

    def health(self, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        """``GET /healthz``: 200 when every stage is loaded, 503 with each stage's state while not. Raises OSError when
        nothing answers at the URL."""
        return self._call("GET", "healthz", timeout=timeout)
