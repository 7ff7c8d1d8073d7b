"""Ray Data reading and validation: every input row ends up accepted or in the rejects table, with its reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_vdr.config import DataConfig, ImageLimits, SourceConfig
from ray_vdr.data.sources import blocks_table, build_dataset, infer_format, read_rejects, split_blocks
from ray_vdr.data.triplets import DataError, TripletSpec

pytestmark = pytest.mark.slow


def png(color, size=(48, 64), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


GOOD = png("white")
# (query, image, negative_0, expected reject reason or None)
PLANTED = [
    ("q ok 1", GOOD, png("gray"), None),
    ("q ok cmyk", png((0, 0, 0, 0), mode="CMYK", fmt="JPEG"), GOOD, None),
    ("q ok rgba", png((1, 2, 3, 0), mode="RGBA"), GOOD, None),
    ("", GOOD, GOOD, "empty_query"),
    (None, GOOD, GOOD, "empty_query"),
    ("q corrupt", b"\x89PNG not really", GOOD, "corrupt_image"),
    ("q tiny", png("white", size=(1, 1)), GOOD, "too_small"),
    ("q bomb", png(0, size=(9000, 9000), mode="1"), GOOD, "decompression_bomb"),
    ("q missing neg", GOOD, None, "missing_image"),
]


def spec() -> TripletSpec:
    return TripletSpec(negative_columns=("negative_0",), limits=ImageLimits(max_pixels=20_000_000))


def consume(ds) -> list[dict]:
    rows = []
    for batch in ds.iter_batches(batch_size=4, batch_format="pyarrow"):
        rows.extend(batch.select(["row_id", "query"]).to_pylist())
    return rows


def check_accounting(rows, rejects, n_in):
    expected = sorted(r[3] for r in PLANTED if r[3])
    assert sorted(rejects.column("reason").to_pylist()) == expected
    assert len(rows) + rejects.num_rows == n_in
    assert len({r["row_id"] for r in rows}) == len(rows)
    assert all(rejects.column("source").to_pylist())


def planted_table(repeat: int = 1) -> pa.Table:
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [r for _ in range(repeat) for r in PLANTED]
    return pa.table(
        {
            "query": [r[0] for r in rows],
            "image": [{"bytes": r[1], "path": None} for r in rows],
            "negative_0": [None if r[2] is None else {"bytes": r[2], "path": None} for r in rows],
        },
        schema=pa.schema([("query", pa.string()), ("image", img), ("negative_0", img)]),
    )


def test_parquet_rejects_add_up(ray_local, tmp_path):
    pq.write_table(planted_table(), tmp_path / "part-0.parquet", row_group_size=3)
    ds = build_dataset(SourceConfig(uri=str(tmp_path)), spec(), str(tmp_path / "rejects"), batch_size=4)
    rows = consume(ds)
    check_accounting(rows, read_rejects(str(tmp_path / "rejects")), len(PLANTED))
    assert {r["query"] for r in rows} == {"q ok 1", "q ok cmyk", "q ok rgba"}

    # an eval split, read once by the driver: its blocks hold the same rows, its rejects the same reasons
    (tmp_path / "eval").mkdir()
    pq.write_table(planted_table(), tmp_path / "eval" / "part-0.parquet", row_group_size=3)
    blocks = split_blocks(SourceConfig(uri=str(tmp_path / "eval")), spec(), str(tmp_path / "eval-rejects"),
                          batch_size=4)
    table = blocks_table(blocks)
    assert sorted(table.column("query").to_pylist()) == sorted(r["query"] for r in rows)
    check_accounting(table.to_pylist(), read_rejects(str(tmp_path / "eval-rejects")), len(PLANTED))
    with pytest.raises(DataError, match="no valid rows"):
        blocks_table([])


def test_jsonl_images_folder_with_missing_file(ray_local, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(GOOD)
    (tmp_path / "img" / "bad.png").write_bytes(b"garbage")
    lines = [
        {"query": "fine", "image": "img/a.png", "negative_0": "img/a.png"},
        {"query": "gone", "image": "img/nope.png", "negative_0": "img/a.png"},
        {"query": "bad", "image": "img/a.png", "negative_0": "img/bad.png"},
        {"query": "  ", "image": "img/a.png", "negative_0": "img/a.png"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = SourceConfig(uri=str(tmp_path / "train.jsonl"))
    assert infer_format(src) == "images_jsonl"
    rows = consume(build_dataset(src, spec(), str(tmp_path / "rej")))
    rejects = read_rejects(str(tmp_path / "rej"))
    assert [r["query"] for r in rows] == ["fine"]
    by_query = dict(zip(rejects.column("query").to_pylist(), rejects.column("reason").to_pylist(), strict=False))
    assert by_query == {"gone": "missing_file", "bad": "corrupt_image", "  ": "empty_query"}


def test_hf_save_to_disk(ray_local, tmp_path):
    import datasets

    datasets.Dataset(planted_table(repeat=2)).save_to_disk(str(tmp_path / "hf"), max_shard_size="20KB")
    src = SourceConfig(uri=str(tmp_path / "hf"))
    assert infer_format(src) == "hf_disk"
    rows = consume(build_dataset(src, spec(), str(tmp_path / "rej")))
    rejects = read_rejects(str(tmp_path / "rej"))
    assert len(rows) + rejects.num_rows == 2 * len(PLANTED)
    assert sorted(rejects.column("reason").to_pylist()) == sorted(2 * [r[3] for r in PLANTED if r[3]])


def test_synthetic_streams_into_disjoint_shards(ray_local, synthetic, tmp_path):
    """Each Train worker gets its own shard (equal split, as Ray Train does): together, every row exactly once."""
    import threading

    cfg, summary = synthetic
    ds = build_dataset(SourceConfig(uri=str(Path(cfg.output_dir) / "train")),
                       TripletSpec.from_config(DataConfig(num_negatives=1)), str(tmp_path / "rej"))
    shards = ds.streaming_split(2, equal=True)
    seen: list[list[str]] = [[], []]

    def read(i):
        for b in shards[i].iter_batches(batch_size=4, batch_format="pyarrow"):
            seen[i].extend(b.column("row_id").to_pylist())

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    all_ids = seen[0] + seen[1]
    assert len(all_ids) == len(set(all_ids)) == summary.train_rows
    assert len(seen[0]) == len(seen[1]) == summary.train_rows // 2 and not set(seen[0]) & set(seen[1])


def test_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(planted_table().drop(["negative_0"]), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['negative_0'\]"):
        build_dataset(SourceConfig(uri=str(tmp_path)), spec(), str(tmp_path / "rej"))
    with pytest.raises(DataError, match="not found"):
        build_dataset(SourceConfig(uri=str(tmp_path / "nowhere")), spec(), str(tmp_path / "rej"))


def test_hub_dataset_streams_parquet_files(ray_local, synthetic, tmp_path, monkeypatch):
    """The Hub reader lists a dataset's Parquet files and streams them. The Hub cannot be reached here, so a local
    fsspec folder laid out like the Hub (datasets/<repo>/<config>/<split>-*.parquet) stands in for HfFileSystem."""
    import shutil

    import huggingface_hub
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    from ray_vdr.data.sources import count_rows

    syn, summary = synthetic
    repo = tmp_path / "hub" / "datasets" / "org" / "vdr" / "train"
    repo.mkdir(parents=True)
    for i, f in enumerate(sorted((Path(syn.output_dir) / "train").glob("*.parquet"))):
        shutil.copy(f, repo / f"train-{i:05d}-of-99999.parquet")

    class FakeHub(DirFileSystem):
        def __init__(self, *args, **kwargs):
            super().__init__(path=str(tmp_path / "hub"), fs=LocalFileSystem())

    import pyarrow.fs as pafs

    import ray_vdr.data.sources as dataset_mod

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeHub)  # listing, in the driver
    hub_root = pafs.SubTreeFileSystem(str(tmp_path / "hub"), pafs.LocalFileSystem())  # reading, in Ray tasks
    monkeypatch.setattr(dataset_mod, "_hub_filesystem", lambda: hub_root)
    src = SourceConfig(uri="org/vdr", format="hf_hub", hf_config="train", hf_split="train")
    assert count_rows(src) == summary.train_rows
    rows = consume(build_dataset(src, TripletSpec.from_config(DataConfig()), str(tmp_path / "rej")))
    assert len({r["row_id"] for r in rows}) == summary.train_rows
    assert read_rejects(str(tmp_path / "rej")).num_rows == 0
