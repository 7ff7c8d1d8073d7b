"""The benchmark's report: leaderboard-shaped tables (scores × 100, each task's main metric, the mean per suite), a
per-language breakdown, the time per task, the published reference rows (quoted, never measured here) and a plot of
the score by Matryoshka dimension with and without the reranker. Written as benchmark.md, benchmark.json and
benchmark.png; pure functions of the per-task results (no Ray)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ray_vdr.storage import write_bytes

__all__ = ["REFERENCES", "add_to_model_card", "markdown", "write_report"]

CARD_BEGIN, CARD_END = "<!-- ray-vdr benchmark: begin -->", "<!-- ray-vdr benchmark: end -->"

# Published single numbers, quoted as their sources state them (main metric × 100, the suite's mean).
REFERENCES: list[dict[str, Any]] = [
    {"suite": "vidore-v3", "model": "Qwen3-VL-Embedding-2B", "setting": "single stage", "score": 52.9,
     "source": "Qwen3-VL-Embedding model card (README), ViDoRe V3 NDCG@10"},
    {"suite": "vidore-v3", "model": "Qwen3-VL-Embedding-2B + Qwen3-VL-Reranker-2B", "setting": "two stage",
     "score": 60.8, "source": "Qwen3-VL-Embedding model card (README), ViDoRe V3 NDCG@10"},
    {"suite": "vidore-v3", "model": "Qwen3-VL-Embedding-2B + Qwen3-VL-Reranker-8B", "setting": "two stage",
     "score": 66.7, "source": "Qwen3-VL-Embedding model card (README), ViDoRe V3 NDCG@10"},
    {"suite": "vidore-v3", "model": "nemotron-colembed-vl-8b-v2 (best multi-vector)", "setting": "single stage",
     "score": 63.4, "source": "ViDoRe V3 leaderboard (MTEB)"},
]


def _dim_of(setting: str) -> int:
    return int(re.match(r"dim (\d+)", setting).group(1))


def _depth_of(setting: str) -> int | None:
    m = re.search(r"rerank@(\d+)", setting)
    return int(m.group(1)) if m else None


def _groups(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{suite (or "tasks"): [task names in run order]}."""
    out: dict[str, list[str]] = {}
    for r in results:
        names = out.setdefault(r["task"]["suite"] or "tasks", [])
        if r["task"]["name"] not in names:
            names.append(r["task"]["name"])
    return out


def leaderboard(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{suite: {"metric", "tasks", "rows": [{model, setting, scores: {task: value}, mean}]}}: each task scored by its
    main metric; the mean over the suite's tasks where a row has them all."""
    out = {}
    for suite, tasks in _groups(results).items():
        metrics = {r["task"]["name"]: r["task"]["main_metric"] for r in results if r["task"]["name"] in tasks}
        rows: dict[tuple[str, str], dict[str, float]] = {}
        for r in results:
            if r["task"]["name"] not in tasks:
                continue
            for setting, m in r["scores"].items():
                rows.setdefault((r["model"]["name"], setting), {})[r["task"]["name"]] = m[metrics[r["task"]["name"]]]
        out[suite] = {
            "metric": "/".join(sorted(set(metrics.values()))), "tasks": tasks,
            "rows": [{"model": model, "setting": setting, "scores": scores,
                      "mean": float(np.mean([scores[t] for t in tasks])) if all(t in scores for t in tasks) else None}
                     for (model, setting), scores in rows.items()]}
    return out


def _languages(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{"model · setting": {language: mean main metric over the tasks with that language}}."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in results:
        metric = r["task"]["main_metric"]
        for setting, langs in (r.get("by_language") or {}).items():
            for lang, m in langs.items():
                acc.setdefault(f"{r['model']['name']} · {setting}", {}).setdefault(lang, []).append(m[metric])
    return {row: {lang: float(np.mean(v)) for lang, v in sorted(langs.items())} for row, langs in acc.items()}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for suite, board in report["leaderboard"].items():
        tasks = board["tasks"]
        lines += [f"### {suite}: {board['metric']} × 100", "",
                  "| model | setting | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---:|" * (len(tasks) + 1)]
        lines += [f"| {r['model']} | {r['setting']} | " + " | ".join(_pct(r["scores"].get(t)) for t in tasks)
                  + f" | {_pct(r['mean'])} |" for r in board["rows"]]
        refs = [ref for ref in report.get("references", []) if ref["suite"] == suite]
        if refs:
            lines += ["", "Published reference rows, **quoted, not measured here** (the suite's mean):", "",
                      "| model | setting | mean | source |", "|---|---|---:|---|"]
            lines += [f"| {ref['model']} | {ref['setting']} | {ref['score']} | {ref['source']} |" for ref in refs]
        lines.append("")
    if report["languages"]:
        langs = sorted({lang for v in report["languages"].values() for lang in v})
        lines += ["### By query language (main metric × 100, mean over the tasks with queries in it)", "",
                  "| model · setting | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
        lines += [f"| {row} | " + " | ".join(_pct(v.get(lang)) for lang in langs) + " |"
                  for row, v in report["languages"].items()]
        lines.append("")
    lines += ["### Runs", "", "| model | task | queries | corpus | rejected pages | embed corpus (s) | score (s) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {t['model']} | {t['task']} | {t['queries']} | {t['corpus']} | {t['rejects']} | {t['embed_s']} | "
              f"{t['score_s']} |" for t in report["runs"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Mean main metric over all tasks against the Matryoshka dimension: a line per model, embed only (solid) and
    with the reranker at each depth (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, int | None], dict[int, list[float]]] = {}
    for board in report["leaderboard"].values():
        for r in board["rows"]:
            for v in r["scores"].values():
                series.setdefault((r["model"], _depth_of(r["setting"])), {}).setdefault(
                    _dim_of(r["setting"]), []).append(v)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for (model, depth), by_dim in series.items():
        dims = sorted(by_dim)
        ax.plot(dims, [100 * float(np.mean(by_dim[d])) for d in dims], "o--" if depth else "o-",
                label=f"{model}" + (f" + rerank@{depth}" if depth else " (embed only)"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension (Matryoshka)")
    ax.set_ylabel("mean main metric × 100 (all tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Benchmark score by dimension, with and without the reranker")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(output: str, results: list[dict[str, Any]], *, references: bool = True) -> dict[str, Any]:
    """benchmark.json, benchmark.md and benchmark.png under ``output``; returns the report."""
    suites = {r["task"]["suite"] for r in results}
    report = {
        "leaderboard": leaderboard(results), "languages": _languages(results),
        "references": [ref for ref in REFERENCES if ref["suite"] in suites] if references else [],
        "runs": [{"model": r["model"]["name"], "task": r["task"]["name"], "queries": r["queries"],
                  "corpus": r["corpus"], "rejects": r["rejects"], "duplicates": r.get("duplicates", 0),
                  "embed_s": r["seconds"]["embed_corpus"], "score_s": r["seconds"]["score"],
                  "device": r.get("device")} for r in results],
        "results": results, "output": output}
    report["table"] = markdown(report)
    write_bytes(json.dumps(report, indent=2).encode(), f"{output}/benchmark.json")
    write_bytes(report["table"].encode(), f"{output}/benchmark.md")
    with tempfile.TemporaryDirectory() as tmp:
        plot(report, Path(tmp) / "benchmark.png")
        write_bytes((Path(tmp) / "benchmark.png").read_bytes(), f"{output}/benchmark.png")
    return report


def card_section(report: dict[str, Any], models: list[str]) -> str:
    """The model card's benchmark section: the rows of ``models`` (the labels this embedder ran under) in each suite's
    table."""
    lines = [CARD_BEGIN, "## Benchmark (ray-vdr)", "",
             f"Measured by `ray-vdr benchmark` ({report['output']}), scores × 100, each task's main metric:", ""]
    for suite, board in report["leaderboard"].items():
        rows = [r for r in board["rows"] if r["model"] in models]
        if not rows:
            continue
        tasks = board["tasks"]
        lines += [f"**{suite}** ({board['metric']})", "", "| model | setting | " + " | ".join(tasks) + " | mean |",
                  "|---|---|" + "---:|" * (len(tasks) + 1)]
        lines += [f"| {r['model']} | {r['setting']} | " + " | ".join(_pct(r["scores"].get(t)) for t in tasks)
                  + f" | {_pct(r['mean'])} |" for r in rows]
        lines.append("")
    return "\n".join(lines + [CARD_END]) + "\n"


def add_to_model_card(card: str, section: str) -> str:
    """The card with its benchmark section replaced by ``section`` (appended when it has none)."""
    if CARD_BEGIN in card and CARD_END in card:
        head, rest = card.split(CARD_BEGIN, 1)
        return head + section.rstrip("\n") + rest.split(CARD_END, 1)[1]
    return card.rstrip("\n") + "\n\n" + section
