"""The dataset card of a made training set: ``card.json`` (every count) and ``README.md`` written like a Hugging Face
dataset card (YAML front matter naming the Parquet splits, so ``datasets.load_dataset("parquet", …)`` and the Hub's
viewer find them), saying where the data came from, how it was made, what every filter rejected and how fast."""

from __future__ import annotations

import json
from typing import Any

from ray_vdr.storage import write_bytes

__all__ = ["render_card", "write_card"]


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _split_line(s: dict[str, Any]) -> str:
    sp, k = s["split"], s["mining"]["eval_negatives"]
    if sp["mode"] == "page_range":
        ranges = ", ".join(f"{d} pages {a}-{b}" for d, (a, b) in sp["eval_ranges"].items()) or "none"
        return (f"Split by page range (split {sp['requested']}): inside each large document a contiguous range of "
                f"pages forms the eval split (each query with its page and {k} negatives): {ranges}. The "
                f"{sp['page_gap']} pages on each side of a range are in neither split (their queries are rejects: "
                "split_gap), so no training page neighbours an eval page of its document.")
    return (f"Split by document (split {sp['requested']}): {sp['eval_documents']} of {s['documents']} documents form "
            f"the eval split (each query with its page and {k} negatives); no document is in both splits.")


def render_card(s: dict[str, Any]) -> str:
    """README.md of the dataset from its summary (card.json)."""
    pages, queries, gen = s["pages"], s["queries"], s["generator"]
    front = "\n".join([
        "---", "configs:", "- config_name: default", "  data_files:",
        "  - split: train", "    path: train/*.parquet", "  - split: eval", "    path: eval/*.parquet",
        "task_categories:", "- visual-document-retrieval", "tags:", "- ray-vdr", "- generated-queries", "---"])
    how = {"text": "spans of each page's own text layer (a title with a table row's figures, a row with its column "
                   "headers, a sentence with a name and a number; no model)",
           "vlm": f"questions a vision-language model ({gen.get('model')}) wrote from each page image",
           "callable": f"the function {gen.get('callable')}"}[gen["name"]]
    parts = [front, f"# {s['name']}", "",
             "Training data for visual document retrieval, made by `ray-vdr make-training-data` on "
             f"{s['made_at']} from "
             f"{pages['in']} pages of {s['documents']} documents ({', '.join(s['sources'])}). Each row is a query, the "
             f"page it was written for (`image`) and hard negatives mined with the base embedder "
             f"(`negative_0..k-1`), in the llamaindex-vdr layout the ray-vdr trainers read.", "",
             *[f"> **Warning**: {w}\n" for w in s["split"]["warnings"]],
             "## How it was made", "",
             f"1. Pages: every PDF page (rasterised at {s['dpi']} dpi), image and Parquet row of the sources, with "
             "its text; unreadable input is a reject with its reason.",
             f"2. Queries: {how}; {gen['per_page']} per page at most.",
             "3. Filters: length, boilerplate (text found on many pages), queries generated for more than one page, "
             f"and the consistency filter ({s['consistency']}).",
             f"4. Hard negatives: mined with the base embedder `{s['base_model']}` from the corpus index (ranks "
             f"{s['mining']['rank_min']}..{s['mining']['rank_max']}, margin {s['mining']['margin']}"
             + (", never from the query's own document" if s['mining']['exclude_same_document'] else "") + ").",
             f"5. {_split_line(s)}", ""]
    if gen["name"] == "vlm":
        parts += ["Prompt:", "", "```", gen["prompt"], "```", ""]
    parts += ["## Counts", "",
              _table([("pages in", pages["in"]), ("pages with a kept query", pages["kept"]),
                      ("pages rejected", pages["rejected"]), ("queries generated", queries["generated"]),
                      ("train rows", s["splits"]["train"]), ("eval rows", s["splits"]["eval"])], ("", "count")), "",
              f"Pages in = pages with a kept query + pages rejected: {pages['in']} = {pages['kept']} + "
              f"{pages['rejected']}.", "", "## Rejects by reason", "",
              _table(sorted(pages["rejected_by_reason"].items()), ("page reject", "pages")), "",
              _table(sorted(queries["rejected_by_reason"].items()), ("query reject", "queries")), "",
              "The consistency filter was off." if s["consistency"] == "off" else
              f"The consistency filter kept {s['consistency_kept']} of the {s['consistency_checked']} queries it "
              "checked.", "", "## Time", "",
              _table([(stage, f"{sec:.1f} s") for stage, sec in s["seconds"].items()], ("stage", "time")), "",
              f"Generation: {s['rates']['pages_per_second']} pages/s, {s['rates']['queries_per_second']} queries/s.",
              "", "## Loading", "", "```python", "import datasets", "",
              f"ds = datasets.load_dataset(\"parquet\", data_files={{\"train\": \"{s['output']}/train/*.parquet\", "
              f"\"eval\": \"{s['output']}/eval/*.parquet\"}})", "```", "",
              f"or train on it: `ray-vdr train -c CONFIG data.train.uri={s['output']}/train "
              f"data.eval.uri={s['output']}/eval`.", "",
              "Rejects with their reasons: `generated/` (rows with a reason), `rejects/`, `rejected-pages.parquet`.",
              ""]
    return "\n".join(parts)


def write_card(output: str, summary: dict[str, Any]) -> str:
    """card.json and README.md under ``output``; returns the README's URI."""
    write_bytes(json.dumps(summary, indent=2).encode(), f"{output}/card.json")
    write_bytes(render_card(summary).encode(), f"{output}/README.md")
    return f"{output}/README.md"
