"""What each endpoint replica serves and loads: generations (an index and its model) followed from the live manifest,
loaded in the background so health can say "not yet" instead of a replica hanging in its constructor (no Ray here).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ray_vdr.config import ServeConfig
from ray_vdr.corpus.live import Generation, base_id, serving_generations
from ray_vdr.corpus.manifest import IndexManifest
from ray_vdr.corpus.store import MANIFEST, read_manifest
from serving.core import NotReady

logger = logging.getLogger(__name__)

__all__ = ["Background", "Generations", "wait_for_manifest"]


class Background:
    """Runs ``load`` in a thread. ``get()`` returns its value once loaded, else raises NotReady saying why."""

    def __init__(self, what: str, load: Callable[[Callable[[str], None]], Any]):
        self.what, self.state, self.detail, self.value = what, "loading", f"loading {what}", None
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, args=(load,), name=f"load-{what}", daemon=True)
        self._thread.start()

    def _say(self, detail: str) -> None:
        self.detail = detail

    def _run(self, load) -> None:
        try:
            self.value = load(self._say)
            self.state, self.detail = "ready", f"{self.what} loaded in {time.time() - self.started:.1f}s"
            logger.info(self.detail)
        except Exception as e:
            self.state, self.detail = "failed", f"{type(e).__name__}: {e}"
            logger.error("loading %s failed: %s", self.what, self.detail)

    def get(self) -> Any:
        if self.state != "ready":
            raise NotReady(f"{self.what}: {self.detail}")
        return self.value

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail}


def wait_for_manifest(index: str, poll_s: float, say: Callable[[str], None]) -> IndexManifest:
    """The index manifest; while the embedding job has not published it yet, wait (health stays unready)."""
    waited = 0.0
    while (manifest := read_manifest(index)) is None:
        say(f"waiting for the index at {index} ({MANIFEST} not there yet, {waited:.0f}s)")
        if waited % 60 < poll_s:
            logger.warning("no index at %s yet; waiting for jobs/embed_corpus.py to publish it", index)
        time.sleep(poll_s)
        waited += poll_s
    return manifest


class Generations:
    """What one replica has loaded, per generation: ``load(gen, say)`` runs in the background for each generation
    the live manifest names (or ``cfg.index``), at its index's current and previous versions, and a generation no
    longer named is dropped. The manifests are read again every ``cfg.index_poll_s`` in a thread, so a promotion,
    a sync, a delete or a compaction reaches every replica without a restart. ``per_version=False``: one load per
    index and model, shared by its versions (the query embedder).

    ``get(gid)`` raises NotReady for a generation not (yet, or any more) loaded here: the ingress then falls back to
    the next generation, so a switch never fails a request while replicas load the new one.
    """

    def __init__(self, what: str, cfg: ServeConfig, load: Callable[[Generation, Callable[[str], None]], Any],
                 per_version: bool = True):
        self.what, self.cfg, self._load, self.per_version = what, cfg, load, per_version
        self.loaded: dict[str, Background] = {}
        self.order: list[str] = []
        self.refresh()
        threading.Thread(target=self._follow, name=f"follow-{what}", daemon=True).start()

    def _key(self, gid: str) -> str:
        return gid if self.per_version else base_id(gid)

    def refresh(self) -> None:
        gens = serving_generations(self.cfg)
        if not self.per_version:  # what versions of one index share (the model) is loaded once for them all
            gens = list({g.base_id: g.model_copy(update={"id": g.base_id}) for g in gens}.values())
        for g in gens:
            if g.id not in self.loaded:
                logger.info("%s: loading generation %s (%s)", self.what, g.id, g.index)
                self.loaded[g.id] = Background(f"{self.what} {g.id}", lambda say, g=g: self._load(g, say))
        self.order = [g.id for g in gens]
        for gid in [k for k in self.loaded if k not in self.order]:
            logger.info("%s: dropping generation %s", self.what, gid)
            del self.loaded[gid]  # requests already holding its objects finish with them

    def _follow(self) -> None:
        while True:
            time.sleep(self.cfg.index_poll_s)
            try:
                self.refresh()
            except Exception as e:  # a manifest mid-upload or storage hiccup: keep serving what is loaded
                logger.warning("%s: reading the live manifest %s failed: %s", self.what, self.cfg.live, e)

    def get(self, gid: str) -> Any:
        gid = self._key(gid)
        bg = self.loaded.get(gid)
        if bg is None:
            raise NotReady(f"{self.what}: generation {gid} is not served here (serving {self.order})")
        return bg.get()

    def status(self) -> dict[str, Any]:
        """The preferred generation's state (ready, loading or failed), and every generation's."""
        first = self.loaded[self.order[0]].status()
        return {**first, "generation": self.order[0],
                "generations": {gid: self.loaded[gid].state for gid in self.order}}
