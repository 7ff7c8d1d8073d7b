"""Training benchmarks, measured side by side in one run (not a test).

(a) samples/s of the ray-vdr training pipeline (Ray Data → feeder → 1 Ray Train worker → SentenceTransformerTrainer)
    ÷ a plain single-process SentenceTransformerTrainer on an in-memory ``datasets.Dataset``: the same model, rows,
    loss (CachedMNRL in MatryoshkaLoss), batch, steps, precision and torch thread count. Goal ≥ 1.0.
(b) peak memory of training at batch 64 ÷ batch 8 with the cached loss (GradCache: the mini-batch, not the batch,
    bounds the activations; ray-vdr's loss also collates the pages per mini-batch, and the pages come in opened but
    not decoded, as from the feeder). Plain MNRL is measured next to it, to show what the cache saves. Goal ≤ 1.3.
    Peak = torch.cuda.max_memory_allocated on GPU, the process's peak RSS (VmHWM) on CPU; also printed: the part
    of it added by training (optimizer state, batches, activations) above what the loaded model and data hold.
(c) GradCache under ZeRO: step time of the cached loss under DeepSpeed ZeRO-2 ÷ under ZeRO-1, 2 Ray Train workers
    (``--zero-workers``), alternating runs (goal ≤ 1.10).
(d) peak memory per worker under ZeRO-2 + cached loss at per-worker batch 64 ÷ batch 8, 2 workers (goal ≤ 1.3),
    with ZeRO-1 + plain MNRL at batch 64 next to it (what ZeRO-2 + the cache save); the workers' peak as reported
    by the training run (``peak_memory_bytes``: CUDA allocator peak on GPU, peak RSS on CPU).
Throughput (a) is measured from the end of the first step to the last in both, so that the stream's start-up and
the first step's warm-up are excluded; the whole-run figures are printed too.

Every measurement runs in its own subprocess (clean memory, fresh thread pools). The model is a random-weight
Qwen3-VL embedder with the real module stack; ``--shape small`` (default) is large enough for activations to
dominate the memory probe on CPU, ``tiny`` is the test model, ``2b`` the real Qwen3-VL-2B shape (GPU only).

    python -m bench.train_throughput                       # (a), (b): ~5 min on 2 CPU cores
    python -m bench.train_throughput --parts c,d --threads 1   # ~20 min on 2 CPU cores
    python -m bench.train_throughput --parts d --shape 2b --device cuda --precision bf16 --zero-workers 1
    python -m bench.train_throughput --shape 2b --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import common


def _config(args, batch: int, steps: int, loss: str = "cached_mnrl", workers: int = 1, zero: int | None = None):
    from ray_vdr.config import load_config

    return load_config(common.ROOT / "configs/demo.yaml", [
        f"model.name_or_path={args.out}/model-{args.shape}", "model.builder=load",
        f"model.max_pixels={args.max_pixels}", f"model.dtype={'bfloat16' if args.precision == 'bf16' else 'float32'}",
        f"data.train.uri={args.out}/data/train", "data.eval=null", "synthetic=null",
        f"train.loss={loss}", f"train.per_device_batch_size={batch}", f"train.max_steps={steps}",
        f"train.mini_batch_size={args.mini_batch}", f"train.precision={args.precision}", "train.save_every=null",
        "train.eval_every=null", "train.log_every=0.5", "train.warmup_ratio=0.0",
        f"train.duplicate_free_batches={args.duplicate_free}",
        f"scaling.num_workers={workers}", f"scaling.use_gpu={args.device == 'cuda'}",
        *(["train.strategy=deepspeed", f"train.zero_stage={zero}"] if zero is not None else ["train.strategy=ddp"]),
        # on CPU the workers share the machine with Ray Data's tasks: reserve half a CPU each, never all CPUs
        f"scaling.resources_per_worker={{{'CPU: 1, GPU: 1' if args.device == 'cuda' else f'CPU: {1 / workers}'}}}",
        f"run.storage_path={args.out}/runs", f"run.name=bench-{int(time.time() * 1000)}",
    ])


# ---------------------------------------------------------------------------------------------------------------------
# probes (each in its own process)


def _in_memory_dataset(cfg, rows: int, lazy: bool = False):
    """The validated training rows as an in-memory datasets.Dataset with Image features (what users hand ST).
    ``lazy``: pages come out opened but not decoded, as the feeder's stream hands them to ray-vdr's trainer."""
    import io

    import datasets
    import pyarrow.parquet as pq
    from PIL import Image

    from ray_vdr.data.triplets import TripletSpec, validate_batch

    spec = TripletSpec.from_config(cfg.data, split="train")
    table, _ = validate_batch(pq.read_table(cfg.data.train.uri), spec)
    table = table.slice(0, rows)
    image_cols = spec.output_columns[2:]
    features = datasets.Features({"query": datasets.Value("string"),
                                  **{c: datasets.Image(decode=not lazy) for c in image_cols}})
    data = {"query": table.column("query").to_pylist()}
    for c in image_cols:
        data[c] = [{"bytes": b, "path": None} for b in table.column(c).to_pylist()]
    dataset = datasets.Dataset.from_dict(data, features=features)
    if lazy:
        dataset.set_transform(lambda batch: {"query": batch["query"], **{
            c: [Image.open(io.BytesIO(x["bytes"])) for x in batch[c]] for c in image_cols}})
    return dataset, image_cols


def _plain_trainer(cfg, args, dataset, image_cols, callbacks=()):
    import tempfile

    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

    from ray_vdr.models.load import build_model
    from ray_vdr.train.recipes import build_loss
    from ray_vdr.train.trainer import training_arguments

    cuda = args.device == "cuda"
    model = build_model(cfg.model, device="cuda" if cuda else "cpu")
    prompts = {"query": model.prompts.get("query")} | {c: model.prompts.get("document") for c in image_cols}
    targs = training_arguments(cfg, cfg.train.max_steps, tempfile.mkdtemp(), cuda, {k: v for k, v in prompts.items()
                                                                                       if v})
    return SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset,
                                      loss=build_loss(model, cfg.train, gather=False), callbacks=list(callbacks))


def probe_plain(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    cfg = _config(args, args.batch, args.steps)
    from ray_vdr.train.trainer import ThroughputMeter

    dataset, image_cols = _in_memory_dataset(cfg, args.batch * args.steps)
    trainer = _plain_trainer(cfg, args, dataset, image_cols)
    meter = ThroughputMeter(lambda: trainer.state.global_step * args.batch)
    trainer.add_callback(meter)
    seconds = trainer.train().metrics["train_runtime"]
    return {"samples_per_s": meter.rate(), "whole_run_samples_per_s": args.batch * args.steps / seconds,
            "train_seconds": seconds, "torch_threads": torch.get_num_threads()}


def probe_pipeline(args) -> dict:
    from ray_vdr.train.run import run

    cfg = _config(args, args.batch, args.steps, loss=args.loss, workers=args.workers, zero=args.zero)
    with common.local_ray(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}}):
        result = run(cfg)
    m = result.metrics
    return {"samples_per_s": m["steady_rows_per_second"], "whole_run_samples_per_s": m["rows_per_second"],
            "train_seconds": m["train_seconds"], "torch_threads": m.get("torch_threads"),
            "step_seconds": args.batch * args.workers / m["steady_rows_per_second"],
            "peak_bytes": m["peak_memory_bytes"], "distributed_type": m["distributed_type"]}


def probe_memory(args) -> dict:
    import torch
    from transformers import TrainerCallback

    from ray_vdr.cluster import process_memory

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    cfg = _config(args, args.batch, args.steps, loss=args.loss)
    # ray-vdr's trainer as the workers run it: pages opened lazily and, with the cached loss, collated per mini-batch
    dataset, image_cols = _in_memory_dataset(cfg, args.batch * args.steps, lazy=True)
    held: dict[str, int] = {}

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):  # model and data loaded, nothing trained yet
            if cuda:
                torch.cuda.synchronize()
                held["bytes"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                held["bytes"] = process_memory()[0]
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    from ray_vdr.train.gradcache import defer_page_collation
    from ray_vdr.train.trainer import ThroughputMeter

    trainer = _plain_trainer(cfg, args, dataset, image_cols, [AtTrainBegin()])
    defer_page_collation(trainer)
    meter = ThroughputMeter(lambda: trainer.state.global_step * args.batch)
    trainer.add_callback(meter)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else process_memory()[1]
    return {"held_bytes": held["bytes"], "peak_bytes": peak, "step_bytes": peak - held["bytes"],
            "samples_per_s": meter.rate(),
            "forward_flops_per_sample": _forward_flops(trainer.model, dataset[0], image_cols)}


def _forward_flops(model, row: dict, image_cols: list[str]) -> int:
    """FLOPs of one forward pass over a training row (the query and its pages) as torch's FlopCounterMode counts
    them: matmuls, convolutions and the CUDA attention kernels (it has no entry for SDPA's CPU kernel, so attention is
    left out on CPU). bench/gpu.py turns it into model-FLOPs utilisation. Where the counter's SDPA formula refuses
    grouped-query attention (torch 2.11: "query/key/value shapes are incompatible", Qwen3-VL's text attention on
    CUDA), the row is counted again with eager attention, whose matmuls (keys and values repeated per query head) are
    the same FLOPs."""
    try:
        return _count_flops(model, row, image_cols)
    except AssertionError as e:
        print(f"FLOP counter: {e}; counting with eager attention", file=sys.stderr)
        return _count_flops(model, row, image_cols, attention="eager")


def _count_flops(model, row: dict, image_cols: list[str], attention: str | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    backbone = model[0].auto_model
    previous = backbone.config._attn_implementation
    if attention is not None:
        backbone.set_attn_implementation(attention)
    try:
        total = 0
        for encode, item in [(model.encode_query, row["query"]),
                             *((model.encode_document, row[c]) for c in image_cols)]:
            with FlopCounterMode(display=False) as counter:
                encode([item])
            total += counter.get_total_flops()
        return total
    finally:
        if attention is not None:
            backbone.set_attn_implementation(previous)


# ---------------------------------------------------------------------------------------------------------------------
# driver


def _subprocess(args, probe: str, **overrides) -> dict:
    return common.run_probe(__spec__.name, args, probe, **overrides)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--probe", choices=["plain", "pipeline", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(common.ROOT / "outputs" / "bench-train"))
    p.add_argument("--shape", choices=["tiny", "small", "2b"], default="small")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--max-pixels", type=int, default=256 * 256)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--mini-batch", type=int, default=4)
    p.add_argument("--loss", default="cached_mnrl")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--zero-steps", type=int, default=8, help="steps per run in (c)")
    p.add_argument("--zero-workers", type=int, default=2, help="Ray Train workers in (c) and (d) (GPUs on GPU)")
    p.add_argument("--duplicate-free", type=lambda v: v == "True", default=True, help=argparse.SUPPRESS)
    p.add_argument("--zero-repeats", type=int, default=2, help="alternating runs per stage in (c)")
    p.add_argument("--parts", default="a,b", help="which measurements: a (throughput), b (memory), c (ZeRO-2 ÷ "
                                                  "ZeRO-1 step time), d (ZeRO-2 memory, batch 64 ÷ 8)")
    args = p.parse_args()
    if args.probe:
        probe = {"plain": probe_plain, "pipeline": probe_pipeline, "memory": probe_memory}[args.probe]
        print(json.dumps(probe(args)))
        return

    common.training_inputs(args.out, args.shape, args.max_pixels, args.rows)
    print(f"model: Qwen3-VL embedder, shape {args.shape}, max_pixels {args.max_pixels}, {args.precision}, "
          f"device {args.device}, {args.threads} torch threads; batch {args.batch}, {args.steps} steps, "
          f"CachedMNRL mini-batch {args.mini_batch} in MatryoshkaLoss", flush=True)

    parts = set(args.parts.split(","))
    report = {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    if "a" in parts:
        report.update(_throughput(args))
    if "b" in parts:
        report.update(_memory(args))
    if "c" in parts:
        report.update(_zero_step_time(args))
    if "d" in parts:
        report.update(_zero_memory(args))
    name = "train_bench.json" if parts <= {"a", "b"} else f"train_bench_{'_'.join(sorted(parts))}.json"
    Path(args.out, name).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}/{name}")
    common.write_json(args.json, {**report, "parts": sorted(parts)})


def _throughput(args) -> dict:
    plain = _subprocess(args, "plain")
    pipeline = _subprocess(args, "pipeline")
    ratio_a = pipeline["samples_per_s"] / plain["samples_per_s"]
    print("\n(a) training throughput, samples/s after the first step (same model, rows, loss, batch, steps)")
    for name, r in (("plain SentenceTransformerTrainer, in-memory Dataset", plain),
                    ("ray-vdr pipeline, 1 Ray Train worker", pipeline)):
        print(f"    {name:52s} {r['samples_per_s']:7.2f}   (whole run incl. start-up: "
              f"{r['whole_run_samples_per_s']:.2f}/s over {r['train_seconds']:.1f} s; {r['torch_threads']} threads)")
    print(f"    ratio pipeline ÷ plain: {ratio_a:.3f}   (goal ≥ 1.0)", flush=True)
    return {"plain": plain, "pipeline": pipeline, "throughput_ratio": ratio_a}


def _memory(args) -> dict:
    mem = {}
    for loss in ("cached_mnrl", "mnrl"):
        for batch in (8, 64):
            mem[loss, batch] = _subprocess(args, "memory", loss=loss, batch=batch, steps=args.memory_steps)
    what = "CUDA allocator" if args.device == "cuda" else "process RSS"
    print(f"\n(b) peak memory ({what}), batch 8 → batch 64, and the part added by training")
    for loss in ("cached_mnrl", "mnrl"):
        a, b = mem[loss, 8], mem[loss, 64]
        print(f"    {loss:12s} peak {a['peak_bytes'] / 2**20:8.0f} → {b['peak_bytes'] / 2**20:8.0f} MiB "
              f"(ratio {b['peak_bytes'] / a['peak_bytes']:.2f});  added by training {a['step_bytes'] / 2**20:7.0f} → "
              f"{b['step_bytes'] / 2**20:7.0f} MiB (ratio {b['step_bytes'] / a['step_bytes']:.2f})")
    ratio_b = mem["cached_mnrl", 64]["peak_bytes"] / mem["cached_mnrl", 8]["peak_bytes"]
    print(f"    peak ratio batch 64 ÷ batch 8 with the cached loss: {ratio_b:.2f}   (goal ≤ 1.3)")
    return {"memory": {f"{k[0]}@{k[1]}": v for k, v in mem.items()}, "memory_ratio_cached": ratio_b}


def _zero_step_time(args) -> dict:
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.zero_repeats):
        for zero in (1, 2):  # alternating, so drifts in the machine's speed hit both
            runs[zero].append(_subprocess(args, "pipeline", workers=args.zero_workers, zero=zero, steps=args.zero_steps,
                                          loss="cached_mnrl", duplicate_free=False))
    best = {z: min(r["step_seconds"] for r in rs) for z, rs in runs.items()}
    ratio = best[2] / best[1]
    print(f"\n(c) step time, cached loss (mini-batch {args.mini_batch}) under DeepSpeed, {args.zero_workers} workers x "
          f"batch {args.batch}, {args.zero_steps} steps, after the first step")
    for zero, rs in runs.items():
        print(f"    ZeRO-{zero}: " + ", ".join(f"{r['step_seconds']:.2f} s" for r in rs)
              + f"   (best {best[zero]:.2f} s)")
    print(f"    ratio ZeRO-2 ÷ ZeRO-1 (best of {args.zero_repeats}): {ratio:.3f}   (goal ≤ 1.10)", flush=True)
    return {"zero_step_time": {f"zero{z}": rs for z, rs in runs.items()}, "zero_step_time_ratio": ratio}


def _zero_memory(args) -> dict:
    runs = {}
    for name, zero, loss, batch in (("zero2_cached@8", 2, "cached_mnrl", 8), ("zero2_cached@64", 2, "cached_mnrl", 64),
                                    ("zero1_mnrl@64", 1, "mnrl", 64)):
        # duplicate-free batching would cut batches short on the bench's small dataset (pages repeat)
        runs[name] = _subprocess(args, "pipeline", workers=args.zero_workers, zero=zero, loss=loss, batch=batch,
                                 steps=args.memory_steps, duplicate_free=False)
    what = "CUDA allocator" if args.device == "cuda" else "process RSS"
    print(f"\n(d) peak memory per worker ({what}), {args.zero_workers} workers, {args.memory_steps} steps")
    for name, r in runs.items():
        print(f"    {name:18s} {r['peak_bytes'] / 2**20:8.0f} MiB")
    ratio = runs["zero2_cached@64"]["peak_bytes"] / runs["zero2_cached@8"]["peak_bytes"]
    saved = runs["zero1_mnrl@64"]["peak_bytes"] / runs["zero2_cached@64"]["peak_bytes"]
    print(f"    ratio ZeRO-2 + cached, batch 64 ÷ batch 8: {ratio:.2f}   (goal ≤ 1.3)")
    print(f"    ZeRO-1 + plain MNRL ÷ ZeRO-2 + cached, both at batch 64: {saved:.2f}", flush=True)
    return {"zero_memory": runs, "zero_memory_ratio": ratio, "zero1_mnrl_over_zero2_cached": saved}


if __name__ == "__main__":
    main()
