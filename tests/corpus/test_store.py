"""The index folder's readers without Ray: the manifest check that refuses a foreign model or dimension, and the
page store."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from ray_vdr.corpus.manifest import CorpusBinding
from ray_vdr.corpus.store import IndexMismatch, PageStore, check_manifest
from ray_vdr.models.binding import EmbedderBinding
from ray_vdr.models.load import model_fingerprint, model_signature


def test_manifest_refuses_another_model_or_dimension(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights-a")
    fp = model_fingerprint(model)
    manifest = CorpusBinding(dim=32, model=EmbedderBinding(path=str(model), fingerprint=fp))
    check_manifest(manifest, fingerprint=fp, dim=32)  # the same model and dim: accepted
    with pytest.raises(IndexMismatch, match="32-d embeddings but 64-d"):
        check_manifest(manifest, fingerprint=fp, dim=64)
    (model / "model.safetensors").write_bytes(b"weights-b")  # a fine-tune: same files, other bytes
    with pytest.raises(IndexMismatch, match="not with this model"):
        check_manifest(manifest, fingerprint=model_fingerprint(model), dim=32)


def test_loaders_compare_the_cheap_signature_and_catch_a_swapped_model(tmp_path):
    """At load a model is compared by the signature the manifest stores (names, sizes, small files whole, 8 blocks
    of each large one), not by hashing its weights again; a retrained model in the same folder is still refused.
    An index from before signatures compares the full fingerprint."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden": 64}')
    weights = bytearray(range(256)) * (12 << 10)  # 3 MiB: sampled, not read whole
    (model / "model.safetensors").write_bytes(bytes(weights))
    manifest = CorpusBinding(dim=32, model=EmbedderBinding(path=str(model), fingerprint=model_fingerprint(model),
                                                           signature=model_signature(model)))
    check_manifest(manifest, model_path=str(model), dim=32)
    assert model_signature(f"file://{model}") == manifest.model.signature, "a URI is read in place, alike"
    weights[-100] ^= 0xFF  # a change in the last sampled block
    (model / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(IndexMismatch, match="its files differ"):
        check_manifest(manifest, model_path=str(model))
    legacy = CorpusBinding(dim=32, model=EmbedderBinding(path=str(model), fingerprint=manifest.model.fingerprint))
    with pytest.raises(IndexMismatch, match="its files differ"):
        check_manifest(legacy, model_path=str(model))
    (model / "config.json").write_text('{"hidden": 65}')  # the configs are compared whole
    sig = model_signature(model)
    (model / "config.json").write_text('{"hidden": 64}')
    assert sig != model_signature(model)


def test_page_store_reads_pages_by_position_and_finds_doc_pages(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "pages").mkdir()
    for shard in ("a", "b"):
        pq.write_table(pa.table({"image": [f"{shard}{i}".encode() for i in range(3)],
                                 "thumbnail": [f"t{shard}{i}".encode() for i in range(3)]}),
                       tmp_path / "pages" / f"{shard}.parquet")
    ids = pa.table({"doc_id": ["x.pdf", "x.pdf", "y.png", "z.pdf"], "page": [2, 1, 1, 1],
                    "shard": ["a.parquet", "b.parquet", "a.parquet", "b.parquet"], "row": [0, 2, 1, 0]})
    store = PageStore(str(tmp_path), ids, cache_bytes=4)
    assert store.get([1, 0, 3, 2]) == [b"b2", b"a0", b"b0", b"a1"]
    assert store.get([2], "thumbnail") == [b"ta1"]
    assert store.position("x.pdf", 2) == 0 and store.position("x.pdf", None) == 1, "no page: the document's first"
    assert store.position("x.pdf", 7) is None and store.position("nope", None) is None


FIXTURE = Path(__file__).parent / "fixtures" / "index-2026-12-03"


def test_manifests_written_before_the_typed_contracts_still_load(tmp_path):
    """An index folder's manifest and embedding.json as the code of 2026-12-03 wrote them (untyped dicts; machine
    paths replaced) load into the typed models with every field, and round-trip unchanged; a manifest from before
    versions (no files, no version) reads its top-level files; a misspelt field is refused."""
    from pydantic import ValidationError

    from ray_vdr.corpus.manifest import IndexManifest
    from ray_vdr.corpus.store import read_manifest

    raw = json.loads((FIXTURE / "manifest.json").read_text())
    m = IndexManifest.model_validate(raw)
    assert (m.version, m.dim, m.index.type, m.vectors, m.live, m.files.docs) == (1, 64, "flat", 3, 3,
                                                                                   "versions/v-000001/docs.parquet")
    assert m.model.query_prompt and m.model.pixel_bounds.max_pixels == 16384 and not m.model.trust_remote_code
    assert m.last_run.pages_embedded == 3 and m.last_run.pages.added == 3
    dumped = m.model_dump(mode="json", exclude_unset=True)
    assert dumped == raw, "nothing the old writer recorded is lost or changed"
    binding = CorpusBinding.model_validate(json.loads((FIXTURE / "embedding.json").read_text()))
    assert binding == m.binding()

    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in raw.items() if k not in ("files", "version")}))
    legacy = read_manifest(str(tmp_path))
    assert (legacy.version, legacy.files.index, legacy.files.ids) == (None, "index.faiss", "ids.parquet")
    with pytest.raises(ValidationError, match="live_page"):
        IndexManifest.model_validate({**raw, "live_page": 3})
