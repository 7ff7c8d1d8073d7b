"""The training feeder at cluster scale, simulated: can one BatchFeeder feed a 64-GPU job? (not a test)

Every training row passes through one :class:`~ray_vdr.train.feeder.BatchFeeder` actor, created here by
``ray_vdr.train.run.start_feeder`` with the recipe's settings and global batch. Measured on a local Ray cluster: the
rows/s and MB/s of page bytes it delivers to 8, 32 and 64 simulated ranks that only receive: each fetches its slices
of k steps a call as ``SliceStream`` does (``feeder.get.remote(rank, step, k)``, k = ``train.feeder_fetch_steps``,
each of ``--fetch-steps``; awaited in the receiving process, which gets the bytes), as fast as the feeder serves; ranks
are coroutines in a few receiver actors. Sources: ``materialized`` (validated rows held in the object store: the
feeder's own ceiling, as on a cluster whose other CPUs run the reads) and ``stream`` (Parquet reads and validation as
Ray Data tasks on this machine's CPUs; also timed alone).

Each rate counts the slices received in ``--seconds``, after every rank had one and ``--warmup-seconds`` passed; CPU
is counted per process group over the same time (what bounded the rate), and a least-squares fit splits the feeder's
CPU into a cost per get call and per row. Also timed: the batcher's intake of a row (Arrow → Python, then its keys).

Computed, not measured, and labelled so: what ``--gpus`` GPUs of the 2B recipe consume, from FLOPs at ``--mfu`` of
``--peak-tflops`` (parameters of the real 2B shape on the meta device, image tokens by the Qwen-VL resize rule at the
recipe's ``max_pixels``), and the headroom = feeder rows/s ÷ that. Every assumption is printed and stored.

    python -m bench.feeder_scale                 # ~5.5 min on 2 CPU cores (the first run also renders the pages)
    python -m bench.feeder_scale --ranks 64 --fetch-steps 1,8 --sources materialized --seconds 30
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from bench import common

MB = 1e6
LETTER_150DPI = (1650, 1275)  # (height, width) of a US-letter page rendered at 150 dpi: larger than the pixel cap


def prepare(args):
    """The bench's pages (synthetic, rendered once) and the recipe's config pointing at them."""
    from ray_vdr.config import SyntheticConfig, load_config
    from ray_vdr.data.synthetic import write_synthetic

    data = Path(args.out) / "data"
    summary = data / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text())["train_rows"] != args.rows:
        write_synthetic(SyntheticConfig(output_dir=str(data), train_queries=args.rows, eval_queries=2, jsonl=False,
                                        seed=1))
    return load_config(common.ROOT / "configs/qwen3vl-2b-vdr.yaml", [
        f"data.train={{uri: {data}/train}}", "data.eval=null", f"data.rejects_path={args.out}/rejects",
        f"run.storage_path={args.out}/runs", "scaling.use_gpu=false", "scaling.resources_per_worker={CPU: 1}",
        "data.cpus_per_task=0.25",  # 2 cores: several small read/validate tasks rather than 2 whole ones
    ])


def receiver_class():
    import ray

    @ray.remote(num_cpus=0)
    class Receiver:
        """Simulated ranks in one process: each fetches its slices k steps a call and keeps only counts and times."""

        def __init__(self, image_columns: list[str]):
            self.cols, self.next_step, self.stop_step = image_columns, {}, None

        async def run(self, feeder, ranks: list[int], fetch_steps: int) -> list[list[tuple[float, int, int, int, int]]]:
            """Fetch ``ranks``' slices from ``feeder``, ``fetch_steps`` a call, from step 0 until told where to stop."""
            self.feeder, self.next_step, self.stop_step = feeder, dict.fromkeys(ranks, 0), None

            async def rank_loop(rank: int) -> list[tuple[float, int, int, int, int]]:
                log = []  # per call: (time received, first step, steps, rows, page bytes)
                while self.stop_step is None or self.next_step[rank] < self.stop_step:
                    step = self.next_step[rank]
                    got = await self.feeder.get.remote(rank, step, fetch_steps)
                    if not got:
                        break
                    rows = [r for g in got for r in g["rows"]]
                    nbytes = sum(len(r[c]) for r in rows for c in self.cols)
                    log.append((time.time(), step, len(got), len(rows), nbytes))
                    self.next_step[rank] = step + len(got)
                return log

            return await asyncio.gather(*(rank_loop(r) for r in ranks))

        async def stop_at(self, step: int | None = None) -> tuple[int, int]:
            """Stop every rank before ``step`` (None: not yet); returns the fewest and most steps a rank received."""
            self.stop_step = step if step is not None else self.stop_step
            return min(self.next_step.values(), default=0), max(self.next_step.values(), default=0)

    return Receiver


def _cpu_by_group() -> dict[str, float]:
    """CPU seconds so far of this driver's process tree, by group (Ray names worker processes ray::<what they run>)."""
    import psutil

    out = dict.fromkeys(("feeder", "receivers", "ray_workers", "ray_daemons", "driver"), 0.0)
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        group = ("driver" if proc.pid == me.pid else "feeder" if title.startswith("ray::BatchFeeder")
                 else "receivers" if title.startswith("ray::Receiver") else "ray_workers" if title.startswith("ray::")
                 else "ray_daemons")
        out[group] += t.user + t.system
    return out


def _busy_cores() -> tuple[float, float, float]:
    """(now, CPU seconds the whole machine has been busy, CPU seconds the hypervisor took from it)."""
    import psutil

    t = psutil.cpu_times()
    return time.time(), t.user + t.nice + t.system + t.irq + t.softirq, t.steal


def measure_feeder(cfg, ds, n_rows: int, ranks: int, fetch_steps: int, receivers: list, args) -> dict:
    """One feeder, created as training creates it for ``ranks`` workers, serving that many simulated ranks (over the
    ``receivers``), ``fetch_steps`` steps a call, for ``args.seconds``: rows/s, page MB/s, calls/s, CPU by group."""
    import ray

    from ray_vdr.train.run import start_feeder

    if args.global_batch % ranks:
        raise SystemExit(f"--global-batch {args.global_batch} does not split evenly over {ranks} ranks")
    max_steps, per_device = 10 ** 6 // args.global_batch, args.global_batch // ranks
    train = {"per_device_batch_size": per_device, "max_steps": max_steps, "feeder_fetch_steps": fetch_steps}
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": ranks}),
                                 "train": cfg.train.model_copy(update=train)})
    feeder = start_feeder(cfg, ds, ranks, max_steps=max_steps, n_rows=n_rows)
    ray.get(feeder.start.remote("bench", None))
    per = -(-ranks // len(receivers))
    groups = [list(range(i, min(i + per, ranks))) for i in range(0, ranks, per)]
    receivers = receivers[: len(groups)]
    runs = [r.run.remote(feeder, g, fetch_steps) for r, g in zip(receivers, groups, strict=True)]
    while min(p[0] for p in ray.get([r.stop_at.remote() for r in receivers])) < 1:  # start-up is not timed
        time.sleep(0.1)
    time.sleep(args.warmup_seconds)
    cpu0, busy0 = _cpu_by_group(), _busy_cores()
    time.sleep(args.seconds)
    cpu1, busy1 = _cpu_by_group(), _busy_cores()
    stop = max(p[1] for p in ray.get([r.stop_at.remote() for r in receivers])) + 1
    ray.get([r.stop_at.remote(stop) for r in receivers])
    logs = [log for run in ray.get(runs) for log in run]
    ray.kill(feeder)
    # timed: the calls answered between the two CPU snapshots (by wall time: a stream may deliver in bursts)
    timed = [(s, k, n, b) for log in logs for t, s, k, n, b in log if busy0[0] < t <= busy1[0]]
    wall = busy1[0] - busy0[0]
    steps = len({s + i for s, k, _, _ in timed for i in range(k)})
    if steps < 5:
        raise RuntimeError(f"only {steps} steps timed at {ranks} ranks: raise --seconds")
    rows, nbytes = sum(n for _, _, n, _ in timed), sum(b for *_, b in timed)
    return {"ranks": ranks, "per_device": per_device, "fetch_steps": fetch_steps, "shape": f"{ranks}x{per_device} "
            f"k={fetch_steps}", "rows_per_call": per_device * fetch_steps, "steps_timed": steps, "seconds": wall,
            "rows_per_s": rows / wall, "mb_per_s": nbytes / wall / MB, "get_calls_per_s": len(timed) / wall,
            "cpu_cores": (cores := {k: (cpu1[k] - cpu0[k]) / wall for k in cpu0}),
            "machine_busy_cores": (busy := (busy1[1] - busy0[1]) / wall),
            "other_processes_cores": busy - sum(cores.values()), "machine_steal_cores": (busy1[2] - busy0[2]) / wall}


def measure_stream(ds) -> dict:
    """The validated stream alone, one epoch read in this process as the feeder reads it (start-up included)."""
    import pyarrow.compute as pc

    began, rows, nbytes = time.time(), 0, 0
    for table in ds.iter_batches(batch_size=64, batch_format="pyarrow"):
        rows += table.num_rows
        nbytes += sum(pc.sum(pc.binary_length(table[c])).as_py() for c in table.column_names[2:])
    seconds = time.time() - began
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "mb_per_s": nbytes / seconds / MB}


def intake(tables: list) -> tuple[float, float]:
    """ms per row of the GlobalBatcher's intake (one thread), and of its Arrow → Python part (the rest: the keys)."""
    import pyarrow as pa

    from ray_vdr.train.batching import GlobalBatcher

    table = pa.concat_tables(tables)
    began = time.perf_counter()
    table.to_pylist()
    mid = time.perf_counter()
    GlobalBatcher(1, 1, table.column_names[2:]).add_table(table)
    return (time.perf_counter() - mid) / table.num_rows * 1e3, (mid - began) / table.num_rows * 1e3


def cpu_fit(runs: list[dict]) -> dict | None:
    """Feeder CPU seconds per get call and per row, fitted to the runs (cores = a·calls/s + b·rows/s), and the rows/s
    each run's shape would reach if the feeder had one whole core (computed from the fit)."""
    import numpy as np

    if len({r["rows_per_call"] for r in runs}) < 2:
        return None
    x = np.array([[r["get_calls_per_s"], r["rows_per_s"]] for r in runs])
    y = np.array([r["cpu_cores"]["feeder"] for r in runs])
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"ms_per_call": a * 1e3, "ms_per_row": b * 1e3, "residual_cores": (y - x @ [a, b]).tolist(),
            "one_core_rows_per_s": {r["shape"]: 1 / (a / r["rows_per_call"] + b) for r in runs}}


def headroom(report: dict, need: dict) -> list[dict]:
    """Feeder rows/s at the most ranks ÷ the job's consumption, per (scenario, k): as measured, and with one core."""
    runs = report["feeder"].get("materialized") or next(iter(report["feeder"].values()))
    one_core = (report["feeder_cpu"] or {"one_core_rows_per_s": {}})["one_core_rows_per_s"]
    return [{"scenario": i, "ranks": r["ranks"], "per_device": r["per_device"], "fetch_steps": r["fetch_steps"],
             "measured": r["rows_per_s"] / s["rows_per_s"], **({"one_core": one_core[r["shape"]] / s["rows_per_s"]}
                                                                if r["shape"] in one_core else {})}
            for i, s in enumerate(need["scenarios"]) for r in runs if r["ranks"] == max(x["ranks"] for x in runs)]


# ---------------------------------------------------------------------------------------------------------------------
# computed, not measured: what a 64-GPU run of the 2B recipe consumes


def _param_groups() -> dict[str, int]:
    """Parameters of the real Qwen3-VL-2B shape (meta device: no memory), by how often each is applied."""
    import torch
    from transformers import Qwen3VLModel

    from ray_vdr.models.qwen3vl import QWEN3VL_2B_SHAPE as S
    from ray_vdr.models.qwen3vl import qwen3vl_config, qwen_tokenizer

    tok = qwen_tokenizer(S.vocab_size)
    with torch.device("meta"):
        model = Qwen3VLModel(qwen3vl_config(S, tok, max(S.vocab_size, len(tok))))

    def n(*modules) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    v, t = model.visual, model.language_model
    return {"total": n(model), "vision": n(v), "per_patch": n(v.patch_embed, v.blocks),
            "per_merged_token": n(v.merger, v.deepstack_merger_list), "per_text_token": n(t) - n(t.embed_tokens),
            "text_layers": S.num_hidden_layers, "text_attn_width": S.num_attention_heads * S.head_dim,
            "vision_layers": S.vision_depth, "vision_width": S.vision_hidden_size,
            "patch": S.patch_size, "merge": S.spatial_merge_size}


def consumption(args, page_size: tuple[int, int], bytes_per_row: float) -> dict:
    """Rows/s (and page MB/s) a ``args.gpus``-GPU run of the 2B recipe consumes at ``args.mfu`` of the GPU's peak."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    p = _param_groups()
    factor = p["patch"] * p["merge"]

    def text_fwd(tokens: int) -> float:  # matmuls 2·N per token, attention scores and values 4·seq·width per layer
        return 2 * p["per_text_token"] * tokens + 4 * p["text_layers"] * p["text_attn_width"] * tokens ** 2

    def page_fwd(patches: int) -> float:
        merged = patches // p["merge"] ** 2
        return (2 * p["per_patch"] * patches + 4 * p["vision_layers"] * p["vision_width"] * patches ** 2
                + 2 * p["per_merged_token"] * merged + text_fwd(merged + args.document_tokens))

    scenarios = []
    for name, (h, w) in (("letter page at 150 dpi, resized to the recipe's max_pixels", LETTER_150DPI),
                         ("the bench's own pages (under the cap)", page_size)):
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        patches = (rh // p["patch"]) * (rw // p["patch"])
        forward = text_fwd(args.query_tokens) + 2 * page_fwd(patches)  # query + positive page + negative page
        per_row = args.forward_passes * forward
        per_gpu = args.mfu * args.peak_tflops * 1e12 / per_row
        scenarios.append({"name": name, "page_pixels": [h, w], "resized": [rh, rw], "patches": patches,
                          "image_tokens": patches // p["merge"] ** 2, "forward_tflop_per_row": forward / 1e12,
                          "train_tflop_per_row": per_row / 1e12, "rows_per_s_per_gpu": per_gpu,
                          "rows_per_s": per_gpu * args.gpus, "mb_per_s": per_gpu * args.gpus * bytes_per_row / MB,
                          "steps_per_s": per_gpu * args.gpus / args.global_batch})
    assumptions = [
        f"{args.gpus} GPUs at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s (H200 dense bf16 spec); an "
        "estimate, not a measurement (no GPU was lent)",
        f"Qwen3-VL-Embedding-2B shape: {p['total'] / 1e9:.2f} B parameters, vision tower {p['vision'] / 1e9:.2f} B; "
        "FLOPs per token 2 x the weights it passes (text: all but the embedding table; vision: patch embedding and "
        "blocks per patch, mergers and deepstack mergers per merged token) plus attention 4 x seq x width per layer "
        "(full, not causal-halved)",
        f"one row = a query of {args.query_tokens} tokens (instruction, chat template, query) + positive page + "
        f"negative page, each page its image tokens + {args.document_tokens} tokens (instruction, template)",
        f"{args.forward_passes} forward-equivalents per row: CachedMNRL's no-grad forward, then forward + backward "
        "(2x) per mini-batch; no gradient checkpointing (the recipe's default)",
        f"image patches from the Qwen-VL resize rule (factor {factor}) at min/max_pixels {args.min_pixels:,}/"
        f"{args.max_pixels:,}; vision FLOPs on the {p['patch']}x{p['patch']} patches before the {p['merge']}x"
        f"{p['merge']} merge",
        f"page MB/s at the bench's measured page bytes per row ({bytes_per_row / 1e3:,.1f} kB, two PNG pages)",
    ]
    return {"assumptions": assumptions, "params": p, "gpus": args.gpus, "scenarios": scenarios}


def render(r: dict) -> list[str]:
    """The results as docs/benchmarks.md shows them (bench/report.py)."""
    a, fit = r["args"], r.get("feeder_cpu")
    out = [f"{r['rows']:,} synthetic rows, {r['page_bytes_per_row'] / 1e3:.1f} kB of page bytes each (2 PNG pages); "
           f"global batch {a['global_batch']}, one slice per rank a step, k steps per get call; ranks spread over "
           f"{a['receivers']} receiver processes; {a['seconds']:g} s timed each. CPU in cores over the timed part.", "",
           "| source | ranks x rows each | k | rows/s | page MB/s | get calls/s | CPU: feeder, receivers, Ray workers "
           "+ daemons, other processes |", "|---|---|---|---|---|---|---|"]
    for source, runs in r["feeder"].items():
        out += [f"| {source} | {x['ranks']} x {x['per_device']} | {x['fetch_steps']} | {x['rows_per_s']:,.0f} | "
                f"{x['mb_per_s']:,.1f} | {x['get_calls_per_s']:,.0f} | {c['feeder']:.2f}, {c['receivers']:.2f}, "
                f"{c['ray_workers'] + c['ray_daemons']:.2f}, {x['other_processes_cores']:.2f} |"
                for x in runs if (c := x["cpu_cores"])]
    out.append("")
    if "stream_alone" in r:
        out.append(f"- the validated stream alone, one epoch into the driver: {r['stream_alone']['rows_per_s']:,.0f} "
                   f"rows/s ({r['stream_alone']['seconds']:.1f} s with its start-up)")
    out.append(f"- GlobalBatcher intake, one thread: {r['intake_ms_per_row']:.3f} ms per row, of which Arrow → Python "
               f"{r['to_python_ms_per_row']:.3f} (the rest: the rows' keys, a blake2b hash per page)")
    if fit:
        out.append(f"- feeder CPU, least squares over the materialized runs: {fit['ms_per_call']:.3f} ms per get call "
                   f"+ {fit['ms_per_row']:.3f} ms per row → with one whole core: " + "; ".join(
                       f"{k}: {v:,.0f} rows/s" for k, v in fit["one_core_rows_per_s"].items()))
    out += ["", "**Computed, not measured**: " + "; ".join(r["consumption"]["assumptions"]) + ".", "",
            "| pages | patches (tokens) per page | TFLOP per row | rows/s per GPU | rows/s, MB/s, steps/s for "
            f"{r['consumption']['gpus']} GPUs | one feeder ({r['headroom'][0]['ranks']} ranks) ÷ that, k steps a call: "
            "measured, one core |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(r["consumption"]["scenarios"]):
        ratios = "; ".join(f"k={h['fetch_steps']}: {h['measured']:.2f}x, {h.get('one_core', float('nan')):.2f}x"
                           for h in r["headroom"] if h["scenario"] == i)
        out.append(f"| {c['name']} ({c['page_pixels'][0]} x {c['page_pixels'][1]} → {c['resized'][0]} x "
                   f"{c['resized'][1]}) | {c['patches']:,} ({c['image_tokens']}) | {c['train_tflop_per_row']:.1f} | "
                   f"{c['rows_per_s_per_gpu']:.1f} | {c['rows_per_s']:,.0f}, {c['mb_per_s']:,.0f}, "
                   f"{c['steps_per_s']:.1f} | {ratios} |")
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--out", default=str(common.ROOT / "outputs" / "bench-feeder"))
    p.add_argument("--rows", type=int, default=1024, help="synthetic training rows (pages 448 x 576 PNG)")
    p.add_argument("--ranks", default="8,32,64", help="simulated ranks, comma-separated")
    p.add_argument("--fetch-steps", default="1,4,8",
                   help="steps per get call (train.feeder_fetch_steps), comma-separated: each measured at every "
                   "--ranks on the materialized source")
    p.add_argument("--sources", default="materialized,stream",
                   help="materialized (at every --ranks and --fetch-steps) and/or stream (at the most ranks, with the "
                   "recipe's train.feeder_fetch_steps)")
    p.add_argument("--global-batch", type=int, default=64, help="the recipe's global batch, split over the ranks")
    p.add_argument("--receivers", type=int, default=4, help="receiver processes the ranks are spread over")
    p.add_argument("--seconds", type=float, default=15.0, help="timed part of each measurement")
    p.add_argument("--warmup-seconds", type=float, default=4.0)
    for name, default in (("gpus", 64), ("mfu", 0.40), ("peak-tflops", 989.0), ("min-pixels", 784), ("max-pixels",
                          360_000), ("query-tokens", 40), ("document-tokens", 20), ("forward-passes", 4)):
        p.add_argument(f"--{name}", type=type(default), default=default, help="the consumption estimate's assumption")
    args = p.parse_args()
    ranks, fetch_steps = ([int(v) for v in arg.split(",")] for arg in (args.ranks, args.fetch_steps))
    sources = args.sources.split(",")

    import pyarrow.compute as pc
    import ray

    from ray_vdr.cluster import init_ray
    from ray_vdr.data.sources import count_rows
    from ray_vdr.train.run import train_stream

    cfg = prepare(args)
    n_rows = count_rows(cfg.data.train)
    init_ray(num_cpus=os.cpu_count(), temp_dir=str(Path(args.out) / "ray"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    report: dict = {"args": vars(args), "rows": n_rows, "feeder": {}}
    stream = lambda: train_stream(cfg)  # noqa: E731 (a fresh one: a Dataset caches what it computed)
    try:
        began = time.time()
        materialized = stream().materialize()
        report["materialize_seconds"] = time.time() - began
        sample = ray.get(materialized.to_arrow_refs()[0])
        report["page_bytes_per_row"] = sum(pc.sum(pc.binary_length(sample[c])).as_py()
                                           for c in sample.column_names[2:]) / sample.num_rows
        report["intake_ms_per_row"], report["to_python_ms_per_row"] = intake(ray.get(materialized.to_arrow_refs()))
        print(f"{n_rows} rows validated and held in the object store in {report['materialize_seconds']:.1f} s")
        if "stream" in sources:
            report["stream_alone"] = measure_stream(stream())
        receivers = [receiver_class().remote(list(sample.column_names[2:])) for _ in range(args.receivers)]
        for source in sources:
            recipe = [(max(ranks), cfg.train.feeder_fetch_steps)]
            for n, k in [(n, k) for n in ranks for k in fetch_steps] if source == "materialized" else recipe:
                r = measure_feeder(cfg, materialized if source == "materialized" else stream(), n_rows, n, k,
                                   receivers, args)
                report["feeder"].setdefault(source, []).append(r)
                cpu = ", ".join(f"{group} {v:.2f}" for group, v in r["cpu_cores"].items())
                print(f"feeder, {source}, {n} ranks, {k} steps a call: {r['rows_per_s']:,.0f} rows/s; CPU cores {cpu}; "
                      f"machine busy {r['machine_busy_cores']:.2f} (other processes {r['other_processes_cores']:.2f}, "
                      f"steal {r['machine_steal_cores']:.2f})", flush=True)
    finally:
        ray.shutdown()
    report["feeder_cpu"] = cpu_fit(report["feeder"].get("materialized", []))
    summary = json.loads((Path(args.out) / "data" / "summary.json").read_text())
    report["consumption"] = c = consumption(args, tuple(reversed(summary["page_size"])), report["page_bytes_per_row"])
    report["headroom"] = headroom(report, c)
    print("", *render(report), sep="\n")
    common.write_json(args.json, report)


if __name__ == "__main__":
    main()
