"""The GPU figures the docs list as not yet measured on GPU, in one prepared run of at most 8 minutes (not a test).

``bash bench/gpu.sh`` runs this on a machine with one GPU (an H200 here). Each step is one of the existing probes in
its own process, under its own time limit and inside one overall budget (``--budget``), in this order:

1. the training step of the Qwen3-VL-2B shape (random weights) with the reference recipe's loss: CachedMNRL
   (mini-batch 1) in MatryoshkaLoss, batch 64, bf16, SDPA attention, max_pixels 360,000: samples/s after the first
   step, peak memory (``torch.cuda.max_memory_allocated``) and model-FLOPs utilisation against 989 TFLOP/s (H100/H200
   dense bf16); ``python -m bench.train_throughput --probe memory``, which runs ray-vdr's own loss and page collation;
2. the same at batch 8: peak memory, and the ratio batch 64 ÷ batch 8;
3. corpus embedding, pages/s of the plain loop (decode + ``encode_document``); ``python -m bench.embed_throughput
   --probe plain``;
4. the reranker, (query, page) pairs/s in training (BCE) and in scoring, logit and dense heads;
   ``python -m bench.rerank_throughput``.

FLOPs per training sample = 4 × the forward FLOPs of its query, positive and negative page as torch's FlopCounterMode
counts them (matmuls, convolutions, attention kernels): the forward and backward of the gradient pass (1 + 2) plus the
cached loss's extra no-grad forward (1). MFU = samples/s × that ÷ 989e12.

None of this imports Ray, DeepSpeed or FAISS, which the GPU image lacks. ``--dry-run`` runs the same steps on the CPU
with the tiny shape, a few rows and small images, two at a time after the first (about half a minute), so the suite
keeps the script working. Each figure is written as JSON under ``--out`` (one file per step, ``gpu.json`` for all of
them) and a table is printed.

    bash bench/gpu.sh                  # on the GPU machine (results in $OUT, or a temporary folder)
    bash bench/gpu.sh --dry-run        # anywhere, CPU only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import common

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16, the spec sheet's figure (a bf16 8192³ matmul measures ~790e12 here)
CACHED_LOSS_PASSES = 4  # forward FLOPs multiples per sample: no-grad forward 1 + forward 1 + backward 2
FLOPS_NOTE = (f"{CACHED_LOSS_PASSES} x the forward FLOPs of a sample's query, positive and negative page as "
              "torch.utils.flop_counter counts them: forward + backward (1 + 2) and the cached loss's no-grad "
              "forward (1)")
NEEDED = ["torch", "transformers", "sentence_transformers", "accelerate", "datasets", "pydantic", "yaml", "pyarrow",
          "PIL", "tokenizers"]
# per-step time limits in seconds (the budget cuts the later ones shorter when the earlier ones ran long)
LIMITS = {"prepare": 150, "train": 240, "train_small": 80, "embed": 80, "rerank": 200}


def settings(dry_run: bool) -> dict:
    """What each step runs with: the recipe's figures on the GPU, the tiny shape on the CPU for the dry run."""
    if dry_run:
        return {"mode": "dry-run (CPU, tiny shape)", "shape": "tiny", "device": "cpu", "precision": "fp32",
                "dtype": "float32", "max_pixels": 128 * 128, "batch": 4, "small_batch": 2, "steps": 2,
                "mini_batch": 1, "pages": 8, "embed_batch": 4, "rerank_batch": 4, "rerank_steps": 2,
                "score_pairs": 8, "score_batch": 4, "threads": 1}
    return {"mode": "GPU", "shape": "2b", "device": "cuda", "precision": "bf16", "dtype": "bfloat16",
            "max_pixels": 360_000, "batch": 64, "small_batch": 8, "steps": 3, "mini_batch": 1, "pages": 256,
            "embed_batch": 16, "rerank_batch": 16, "rerank_steps": 4, "score_pairs": 64, "score_batch": 16,
            "threads": os.cpu_count() or 1}


def plan(s: dict, work: Path) -> list[tuple[str, list[str], Path | None]]:
    """(step, command, the JSON file it writes or None: the last line it prints) in order; ``work`` holds the models
    and data (gigabytes on the GPU: never under --out, whose files come back from the GPU machine)."""
    shared = ["--out", str(work), "--shape", s["shape"], "--device", s["device"], "--max-pixels", str(s["max_pixels"]),
              "--threads", str(s["threads"])]
    train = ["-m", "bench.train_throughput", "--probe", "memory", *shared, "--precision", s["precision"], "--loss",
             "cached_mnrl", "--mini-batch", str(s["mini_batch"]), "--steps", str(s["steps"])]
    rerank = ["-m", "bench.rerank_throughput", *shared, "--dtype", s["dtype"], "--batch", str(s["rerank_batch"]),
              "--steps", str(s["rerank_steps"]), "--score-pairs", str(s["score_pairs"]), "--score-batch",
              str(s["score_batch"])]
    return [
        ("prepare", ["-m", "bench.gpu", "--probe", "prepare", "--out", str(work), "--shape", s["shape"], "--max-pixels",
                     str(s["max_pixels"]), "--rows", str(s["batch"] * s["steps"])], None),
        ("train", [*train, "--batch", str(s["batch"])], None),
        ("train_small", [*train, "--batch", str(s["small_batch"])], None),
        ("embed", ["-m", "bench.embed_throughput", "--probe", "plain", *shared, "--dtype", s["dtype"], "--pages",
                   str(s["pages"]), "--batch", str(s["embed_batch"])], None),
        ("rerank", [*rerank, "--heads", "logit,dense", "--json", str(work / "rerank.json")], work / "rerank.json"),
    ]


def prepare(args) -> dict:
    """The embedder and the training rows the train probes read, built once; the embedding probe's model folder
    (``model-<shape>-<max_pixels>``) is the same build (same builder, shape and bounds), so it links to it."""
    model = common.training_inputs(args.out, args.shape, args.max_pixels, args.rows)
    link = Path(args.out) / f"model-{args.shape}-{args.max_pixels}"
    if not link.exists():
        link.symlink_to(model.name)
    return {"model": model.name, "rows": args.rows}


def preflight(dry_run: bool) -> list[str]:
    """Problems that stop the run before it starts: a package the steps import is missing, or no GPU."""
    problems = [f"{name} is not installed: carry its wheel (docs/bench/notes/gpu.md)" for name in NEEDED
                if importlib.util.find_spec(name) is None]
    if not dry_run and not problems:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA device: run with --dry-run on a machine without a GPU")
    return problems


def run_step(name: str, argv: list[str], written: Path | None, work: Path, deadline: float, log) -> dict:
    """Run one step in its own process within its limit and the budget; its result is the last JSON line it prints
    (the probes) or the JSON file it writes (the reranker bench)."""
    shown = "python " + " ".join(argv).replace(str(work), "$WORK")
    limit = min(LIMITS[name], deadline - time.monotonic())
    if limit < 10:
        return {"status": "skipped: no time left in the budget", "command": shown}
    began = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    print(f"== {name}: {shown}  (limit {limit:.0f} s)", flush=True)
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=common.ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        out, err = proc.stdout, proc.stderr
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        out, err, status = _text(e.stdout), _text(e.stderr), f"timed out after {limit:.0f} s"
    seconds = time.monotonic() - began
    log.write(f"== {name} ({status}, {seconds:.0f} s): {shown}\n{out[-20000:]}\n-- stderr --\n{err[-20000:]}\n")
    record = {"status": status, "seconds": round(seconds, 1), "command": shown}
    if status == "ok":
        record["result"] = json.loads(written.read_text() if written else out.strip().splitlines()[-1])
    else:
        record["error"] = err[-3000:]
    print(f"   {status} in {seconds:.0f} s", flush=True)
    return record


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def figures(steps: dict) -> dict:
    """The figures the docs ask for, from the steps that finished (a step that did not leaves its figures out)."""
    def result(name):
        return steps.get(name, {}).get("result")

    f: dict = {}
    if train := result("train"):
        per_sample = CACHED_LOSS_PASSES * train["forward_flops_per_sample"]
        f.update(train_samples_per_s=train["samples_per_s"], train_peak_bytes=train["peak_bytes"],
                 forward_flops_per_sample=train["forward_flops_per_sample"], train_flops_per_sample=per_sample,
                 train_tflops=train["samples_per_s"] * per_sample / 1e12,
                 mfu=train["samples_per_s"] * per_sample / PEAK_FLOPS)
    if small := result("train_small"):
        f["small_batch_peak_bytes"] = small["peak_bytes"]
        if train:
            f["memory_ratio"] = train["peak_bytes"] / small["peak_bytes"]
    if embed := result("embed"):
        f["embed_pages_per_s"] = embed["pages_per_s"]
    if rerank := result("rerank"):
        for r in rerank["results"]:
            f[f"rerank_{r['head']}"] = {k: r[k] for k in ("train_pairs_per_s", "score_pairs_per_s", "params")}
    return f


def render(r: dict) -> list[str]:
    """The figures as a table (printed at the end of a run; bench/report.py renders docs/benchmarks.md with it)."""
    s, f, steps = r["settings"], r["figures"], r["steps"]
    memory = "CUDA allocator" if s["device"] == "cuda" else "process RSS"

    def cell(key: str, step: str, show: Callable) -> str:
        return show(f[key]) if key in f else f"not measured: {steps.get(step, {}).get('status', 'not run')}"

    def mib(x: float) -> str:
        return f"{x / 2**20:,.0f} MiB"

    def rate(x: float) -> str:
        return f"{x:,.2f}"

    out = [f"{s['mode']}: Qwen3-VL {s['shape']} shape, random weights, {s['precision']}, SDPA, max_pixels "
           f"{s['max_pixels']:,}. FLOPs per training sample = {r['flops_per_sample_note']}; MFU against "
           f"{r['peak_flops'] / 1e12:,.0f} TFLOP/s.", "", "| figure | value |", "|---|---|",
           f"| training step, batch {s['batch']}, CachedMNRL (mini-batch {s['mini_batch']}) in MatryoshkaLoss: "
           f"samples/s after the first step | {cell('train_samples_per_s', 'train', rate)} |",
           f"| peak memory ({memory}), batch {s['batch']} | {cell('train_peak_bytes', 'train', mib)} |",
           f"| model FLOPs per sample; achieved | "
           f"{cell('train_flops_per_sample', 'train', lambda x: f'{x / 1e9:,.1f} GFLOP')}; "
           f"{cell('train_tflops', 'train', lambda x: f'{x:,.3g} TFLOP/s')} |",
           f"| MFU | {cell('mfu', 'train', lambda x: f'{x:.3g}')} |",
           f"| peak memory ({memory}), batch {s['small_batch']} | "
           f"{cell('small_batch_peak_bytes', 'train_small', mib)} |",
           f"| peak memory, batch {s['batch']} ÷ batch {s['small_batch']} | "
           f"{cell('memory_ratio', 'train_small', lambda x: f'{x:.2f}')} |",
           f"| corpus embedding, plain loop (decode + encode_document, batch {s['embed_batch']}): pages/s | "
           f"{cell('embed_pages_per_s', 'embed', rate)} |"]
    for head in ("logit", "dense"):
        pairs = cell(f"rerank_{head}", "rerank",
                     lambda x: f"{rate(x['train_pairs_per_s'])}, {rate(x['score_pairs_per_s'])}")
        out.append(f"| reranker, {head} head: pairs/s in training (batch {s['rerank_batch']}), in scoring (batch "
                   f"{s['score_batch']}) | {pairs} |")
    out += ["", "Steps: " + "; ".join(f"{k} {v['status']}" + (f" in {v['seconds']:.0f} s" if "seconds" in v else "")
                                      for k, v in steps.items()) + "."]
    return out


def main() -> int:
    p = common.parser(__doc__, json_help="docs/bench/results/gpu-gpu.json for bench/report.py, from a GPU run only")
    p.add_argument("--probe", choices=["prepare"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--max-pixels", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny shape (about half a minute)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder for the figures' JSON files (default: $OUT, else a new temporary folder)")
    p.add_argument("--budget", type=float, default=460, help="seconds for all the steps together")
    args = p.parse_args()
    if args.probe:
        print(json.dumps(prepare(args)))
        return 0

    s = settings(args.dry_run)
    if problems := preflight(args.dry_run):
        print("cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="ray-vdr-gpu-out-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ray-vdr-gpu-work-"))
    deadline = time.monotonic() + args.budget
    found = common.machine()
    print(f"ray-vdr GPU figures, {s['mode']}: shape {s['shape']}, {s['precision']}, SDPA, max_pixels "
          f"{s['max_pixels']:,}, batch {s['batch']} and {s['small_batch']}, CachedMNRL mini-batch {s['mini_batch']}; "
          f"versions: " + ", ".join(f"{d} {found.get(d, 'missing')}" for d in ("torch", "transformers",
                                                                       "sentence-transformers")),
          flush=True)
    steps: dict[str, dict] = {}
    try:
        with open(out / "gpu-steps.log", "w") as log:
            (name, argv, written), *rest = plan(s, work)
            steps[name] = run_step(name, argv, written, work, deadline, log)

            def after_prepare(step: tuple[str, list[str], Path | None]) -> dict:
                name, argv, written = step
                if name.startswith("train") and steps["prepare"]["status"] != "ok":
                    return {"status": "skipped: prepare did not finish"}
                return run_step(name, argv, written, work, deadline, log)

            # on the GPU one step at a time (a throughput figure needs the device to itself); the dry run's tiny
            # steps (one thread each, mostly imports) two at a time
            with ThreadPoolExecutor(2 if args.dry_run else 1) as pool:
                for (name, _, _), record in zip(rest, pool.map(after_prepare, rest), strict=True):
                    steps[name] = record
                    (out / f"{name.replace('_', '-')}.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"settings": s, "peak_flops": PEAK_FLOPS, "flops_per_sample_note": FLOPS_NOTE, "figures": figures(steps),
              "steps": {k: {x: v[x] for x in v if x != "error"} for k, v in steps.items()}}
    print("\n" + "\n".join(render(report)), flush=True)
    common.write_json(str(out / "gpu.json"), report)
    common.write_json(args.json, report)
    return 0 if all(v["status"] == "ok" for v in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
