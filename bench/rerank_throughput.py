"""Reranker throughput, both head styles side by side in one run (not a test): (query, page image) pairs per second

(a) in training: CrossEncoderTrainer with BinaryCrossEntropyLoss, ``--batch`` pairs per step (the reranker job's
    per-device step: queries x (1 + negatives)), timed from the end of the first step to the last;
(b) in scoring: ``CrossEncoder.predict`` at ``--score-batch`` pairs per forward (what the serving Reranker and the
    two-stage evaluation do), timed after a warm-up batch.

Models are random-weight Qwen3-VL rerankers with the real module stacks (``--shape small`` by default; ``2b`` is
the Qwen3-VL-2B shape, for GPUs): ``logit`` = Qwen3VLForConditionalGeneration → LogitScore("yes", "no") as
Qwen3-VL-Reranker-2B; ``dense`` = Qwen3VLModel → last-token pooling → Dense(1). Pages are synthetic 448x576 pages at
the ``--max-pixels`` budget (the reference bounds are 784..360000).

    python -m bench.rerank_throughput                       # CPU, small shape (~3 min on 2 cores)
    python -m bench.rerank_throughput --shape 2b --device cuda --dtype bfloat16 --max-pixels 360000
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def _pairs(n: int) -> list[tuple[str, object]]:
    from ray_vdr.config import SyntheticConfig
    from ray_vdr.data.images import pil_pages
    from ray_vdr.data.render import page_png
    from ray_vdr.data.synthetic import generate

    cfg = SyntheticConfig(train_queries=n, eval_queries=1, jsonl=False, seed=11)
    train, _ = generate(cfg)
    rows = train[:n]
    pages = pil_pages([page_png(r.positive, cfg.page_width, cfg.page_height) for r in rows])
    return [(r.query, page) for r, page in zip(rows, pages, strict=True)]


def _model(args, head: str) -> Path:
    from ray_vdr.models.builders import build_qwen3vl_reranker

    path = Path(args.out) / f"reranker-{args.shape}-{head}-{args.max_pixels}"
    if not (path / "modules.json").is_file():
        build_qwen3vl_reranker(path, common.model_shape(args.shape), head=head, min_pixels=784,
                               max_pixels=args.max_pixels, dtype=args.dtype)
    return path


def measure(args, head: str, pairs) -> dict:
    import datasets
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    from ray_vdr.models.processor import install_image_only_processor

    install_image_only_processor()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = CrossEncoder(str(_model(args, head)), device=args.device,
                         model_kwargs={"dtype": getattr(torch, args.dtype), "attn_implementation": "sdpa"})
    steps = args.steps
    n = args.batch * steps
    train_pairs = [pairs[i % len(pairs)] for i in range(n)]
    ds = datasets.Dataset.from_dict({"query": [q for q, _ in train_pairs], "document": [p for _, p in train_pairs],
                                     "label": [float(i % 4 == 0) for i in range(n)]})

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_step_end(self, *a, **k):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = CrossEncoderTrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-5,
            report_to="none", save_strategy="no", use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
            prompts=model.prompts[model.default_prompt_name], disable_tqdm=True, logging_steps=steps)
        CrossEncoderTrainer(model=model, args=targs, train_dataset=ds, loss=BinaryCrossEntropyLoss(model),
                            callbacks=[clock]).train()
    train_rate = args.batch * (len(clock.marks) - 1) / (clock.marks[-1] - clock.marks[0])
    peak_train = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None

    score_pairs = [pairs[i % len(pairs)] for i in range(args.score_pairs)]
    model.predict(score_pairs[: args.score_batch], batch_size=args.score_batch, show_progress_bar=False)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.predict(score_pairs, batch_size=args.score_batch, show_progress_bar=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    score_rate = len(score_pairs) / (time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {"head": head, "shape": args.shape, "device": args.device, "dtype": args.dtype,
            "max_pixels": args.max_pixels, "params": params, "train_pairs_per_s": round(train_rate, 1),
            "train_batch": args.batch, "score_pairs_per_s": round(score_rate, 1), "score_batch": args.score_batch,
            "peak_train_memory_bytes": peak_train,
            "torch_threads": torch.get_num_threads() if args.device == "cpu" else None}


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--shape", default="small", choices=["tiny", "small", "2b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-pixels", type=int, default=128 * 128)
    p.add_argument("--batch", type=int, default=32, help="pairs per training step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--score-batch", type=int, default=16)
    p.add_argument("--score-pairs", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heads", default="logit,dense")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "ray-vdr-bench-rerank"))
    args = p.parse_args()
    pairs = _pairs(64)
    results = [measure(args, head, pairs) for head in args.heads.split(",")]
    for r in results:
        print(json.dumps(r))
    print("\n| head | params | train pairs/s (batch) | score pairs/s (batch) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['head']} | {r['params'] / 1e6:.2f} M | {r['train_pairs_per_s']} ({r['train_batch']}) | "
              f"{r['score_pairs_per_s']} ({r['score_batch']}) |")
    if len(results) == 2:
        a, b = results
        print(f"\n{a['head']} ÷ {b['head']}: training {a['train_pairs_per_s'] / b['train_pairs_per_s']:.2f}, "
              f"scoring {a['score_pairs_per_s'] / b['score_pairs_per_s']:.2f}")
    common.write_json(args.json, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
