"""Corpus embedding benchmark: pages/s of the embedding job against a plain loop, side by side in one run (not a test).

(a) pages/s of the embedding job (Ray Data: read + decode tasks → 1 embedding actor → Parquet shards) ÷ a plain
    single-process loop (decode PNG → ``model.encode_document``) over the same pages with the same model, batch
    size and torch thread count. Goal ≥ 1.0: decoding overlaps with inference in the job. Both are timed after
    their first batch (model loading and warm-up excluded); whole-run figures are printed too. The job does more
    per page than the loop: hashing, thumbnails and writing pages and vectors to Parquet.

FAISS recall and latency of the index the job builds: bench/ann_recall.py.

Each measurement of (a) runs in its own subprocess (clean memory, fresh thread pools). The model is a random-weight
Qwen3-VL embedder with the real module stack (``--shape small`` by default, ``2b`` on GPU).

    python -m bench.embed_throughput --parts a        # the pipeline comparison (~3 min on 2 CPU cores)
    python -m bench.embed_throughput --shape 2b --device cuda --parts a
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench import common


def _pages(args) -> list[Path]:
    """``args.pages`` distinct synthetic page PNGs (448x576), written once under --out."""
    folder = Path(args.out) / "pages"
    files = sorted(folder.glob("*.png"))
    if len(files) >= args.pages:
        return files[: args.pages]
    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, png) in enumerate(common.synthetic_pages(args.pages)):
        (folder / f"page-{i:05d}.png").write_bytes(png)
    return sorted(folder.glob("*.png"))[: args.pages]


def _model(args) -> Path:
    from ray_vdr.models.builders import build_qwen3vl_embedder

    path = Path(args.out) / f"model-{args.shape}-{args.max_pixels}"  # the saved processor bounds travel with it
    if not (path / "modules.json").is_file():
        build_qwen3vl_embedder(path, common.model_shape(args.shape), max_pixels=args.max_pixels)
    return path


def probe_plain(args) -> dict:
    import io

    import torch
    from PIL import Image

    from ray_vdr.config import ModelConfig
    from ray_vdr.models.load import build_model

    torch.set_num_threads(args.threads)
    files = _pages(args)
    model = build_model(ModelConfig(name_or_path=str(_model(args)), dtype=args.dtype), device=args.device)
    start = time.perf_counter()
    n, first = 0, None
    for i in range(0, len(files), args.batch):
        images = [Image.open(io.BytesIO(f.read_bytes())).convert("RGB") for f in files[i:i + args.batch]]
        model.encode_document(images, batch_size=len(images), truncate_dim=args.dim, normalize_embeddings=True,
                              convert_to_numpy=True)
        n += len(images)
        first = first or (time.perf_counter(), n)
    end = time.perf_counter()
    return {"pages": n, "seconds": end - start, "pages_per_s": (n - first[1]) / (end - first[0]),
            "whole_run_pages_per_s": n / (end - start), "torch_threads": torch.get_num_threads()}


def probe_job(args) -> dict:
    from ray_vdr.config import load_config
    from ray_vdr.corpus.embed import run

    files = _pages(args)
    out = tempfile.mkdtemp(prefix="bench-index-", dir=args.out)
    cfg = load_config(common.ROOT / "configs/demo.yaml", [
        f"index.model={_model(args)}", f"index.sources=[{files[0].parent}]", f"index.output={out}",
        f"index.batch_size={args.batch}", f"index.dim={args.dim}", "index.actors=1",
        f"index.cpus_per_actor={args.actor_cpus}", f"index.decode_cpus={args.decode_cpus}",
        f"model.dtype={args.dtype}", "model.min_pixels=null", f"model.max_pixels={args.max_pixels}", "synthetic=null",
        f"scaling.use_gpu={args.device == 'cuda'}"])
    with common.local_ray(runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}):
        result = run(cfg)
    s = result.summary
    return {"pages": s["pages_embedded"], "seconds": s["stream_seconds"], "pages_per_s": s["steady_pages_per_second"],
            "whole_run_pages_per_s": s["pages_per_second"], "embed_seconds_in_actor": s["embed_seconds"],
            "job_seconds": s["seconds"]}


def _pipeline(args) -> dict:
    _pages(args)
    _model(args)
    plain = common.run_probe(__spec__.name, args, "plain")
    job = common.run_probe(__spec__.name, args, "job")
    ratio = job["pages_per_s"] / plain["pages_per_s"]
    print(f"\n(a) corpus embedding, {args.pages} pages (448x576 PNG), Qwen3-VL {args.shape}, max_pixels "
          f"{args.max_pixels}, batch {args.batch}, dim {args.dim}, {args.device}")
    print(f"    plain loop (decode + encode_document, {plain['torch_threads']} threads) "
          f"{plain['pages_per_s']:7.2f} pages/s (whole loop {plain['whole_run_pages_per_s']:.2f}/s, "
          f"{plain['seconds']:.1f} s)")
    print(f"    embedding job (decode tasks {args.decode_cpus} CPU, 1 actor {args.actor_cpus} CPU) "
          f"{job['pages_per_s']:7.2f} pages/s (whole stream incl. start-up {job['whole_run_pages_per_s']:.2f}/s, "
          f"{job['seconds']:.1f} s; job {job['job_seconds']:.1f} s with the index)")
    print(f"    ratio job ÷ plain: {ratio:.3f}   (goal ≥ 1.0)", flush=True)
    return {"plain": plain, "job": job, "pipeline_ratio": ratio}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--probe", choices=["plain", "job"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(common.ROOT / "outputs" / "bench-embed"))
    p.add_argument("--shape", choices=["tiny", "small", "2b"], default="small")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-pixels", type=int, default=360_000, help="the reference recipe's bound (600x600)")
    p.add_argument("--pages", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--actor-cpus", type=float, default=max(1.0, (os.cpu_count() or 2) - 0.5))
    p.add_argument("--decode-cpus", type=float, default=0.5)
    p.add_argument("--parts", default="a", help="a (job ÷ plain loop)")
    args = p.parse_args()
    if args.probe:
        probe = {"plain": probe_plain, "job": probe_job}[args.probe]
        print(json.dumps(probe(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    report = {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    if "a" in parts:
        report.update(_pipeline(args))
    name = f"embed_bench_{'_'.join(sorted(parts))}.json"
    Path(args.out, name).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}/{name}")
    common.write_json(args.json, {**report, "parts": sorted(parts)})


if __name__ == "__main__":
    main()
