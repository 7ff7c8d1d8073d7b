"""Query generation without Ray: spans of a page's text, the filters and their reasons, the publish step's parts and
counts, the callable generator's failures, the VLM answer parsing and the vLLM processor config."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ray_vdr.config import QueriesConfig, VLMGeneratorConfig
from ray_vdr.queries.filters import boilerplate_lines, is_boilerplate, length_problem, parse_questions, query_key
from ray_vdr.queries.generate import publish, questions_of
from ray_vdr.queries.text import text_queries

PAGE = """Annual report 2021 2021
Northwind Logistics - 2021 quarterly results
Northwind Logistics | page 12
Q1 Q2 Q3 Q4
Revenue ($M) 854.6 617.2 634.4 672.5
Headcount 7,035 7,391 6,117 6,114
In 2021, Northwind Logistics opened 41 new stores and hired 1,280 people. Figures are unaudited and
presented in millions of US dollars.
Northwind Logistics | 2021 | confidential"""


def test_text_spans_single_the_page_out():
    spans = dict((kind, q) for q, kind in text_queries(PAGE, n=10, seed="p1"))
    assert spans["title_figures"].startswith("Northwind Logistics - 2021 quarterly results")
    rows = [q for q, kind in text_queries(PAGE, n=10, seed="p1") if kind == "table_row"]
    assert "Northwind Logistics - 2021 quarterly results: Revenue ($M) Q1 854.6 Q2 617.2 Q3 634.4 Q4 672.5" in rows
    assert any("Headcount Q1 7,035" in r for r in rows)
    assert spans["sentence"] == "In 2021, Northwind Logistics opened 41 new stores and hired 1,280 people"
    # seeded by the page: the same choice on every run, another page another choice
    assert text_queries(PAGE, n=2, seed="p1") == text_queries(PAGE, n=2, seed="p1")
    assert len(text_queries(PAGE, n=2, seed="p1")) == 2
    # boilerplate lines never make a span; a page without text has none
    title = "northwind logistics - 2021 quarterly results"
    assert not any("quarterly results" in q for q, _ in text_queries(PAGE, n=10, seed="p1", boilerplate={title}))
    assert text_queries(None, n=3, seed="x") == [] and text_queries("  \n ", n=3, seed="x") == []
    assert [k for _, k in text_queries(PAGE, n=10, seed="p1", kinds=["sentence"])] == ["sentence"]


# A textbook page's text layer: a running header (page and chapter number), a section heading, margin numbers and an
# equation number on lines of their own, a sentence wrapped around a margin number, captions and cross-references,
# and a table whose rows' figures belong in its spans.
TEXTBOOK = """48 3 Mechanik fester Körper
3.2 Dichte und Masse
Die Dichte eines Stoffes ist der Quotient aus Masse und Volumen:
17
ρ = m/V (3.4)
Abbildung 3.2: Messung der Dichte mit dem Pyknometer
Metall Dichte
Eisen 7.87
Kupfer 8.96
Gold 19.32
Abbildung 3.3
Die Tabelle gilt bei 20 °C und Normaldruck. Ein Würfel aus Eisen mit 2 cm Kantenlänge
18
wiegt also 62.96 g. Nach Satz 3.5 ist die Dichte eine Materialkonstante."""


def test_text_spans_take_numbers_only_from_their_sentence_or_table_row():
    spans = text_queries(TEXTBOOK, n=20, seed="p48")
    rows = {"Eisen 7.87", "Kupfer 8.96", "Gold 19.32"}
    assert {q for q, k in spans if k == "table_row"} == {f"Mechanik fester Körper: {r.replace(' ', ' Dichte ')}"
                                                         for r in rows}
    assert {q for q, k in spans if k == "sentence"} == {
        "Die Tabelle gilt bei 20 °C und Normaldruck",
        "Ein Würfel aus Eisen mit 2 cm Kantenlänge wiegt also 62.96 g"}, "wrapped across the margin number"
    [title_figures] = [q for q, k in spans if k == "title_figures"]
    assert title_figures in {f"Mechanik fester Körper {r}" for r in rows}, "one row's figures, under the heading"
    stray = {"48", "3", "3.2", "17", "(3.4)", "3.3", "18", "3.5"}  # page, section, margin, equation, figure numbers
    assert not [q for q, _ in spans if stray & set(q.split())]
    # without a table, the title alone: numbers from elsewhere on the page are not appended to a heading
    prose = "\n".join(line for line in TEXTBOOK.splitlines() if not line.startswith(("Eisen", "Kupfer", "Gold")))
    alone = text_queries(prose, n=20, seed="p48")
    assert alone == [("Mechanik fester Körper", "title_figures")] + [(q, "sentence") for q, k in spans
                                                                      if k == "sentence"], alone


def test_filters_name_their_reasons():
    kw = {"min_words": 3, "max_words": 8, "max_chars": 60}
    assert length_problem("", **kw)[0] == "empty_query"
    assert length_problem("revenue 2021", **kw)[0] == "query_too_short"
    assert length_problem(" ".join(["word"] * 9), **kw)[0] == "query_too_long"
    assert length_problem("x" * 61 + " a b", **kw)[0] == "query_too_long"
    assert length_problem("Northwind revenue in 2021", **kw) is None
    lines = {"figures are unaudited": 40, "northwind logistics - 2021 quarterly results": 1, "annual report 2021": 9}
    found = boilerplate_lines(lines, 50, share=0.2, min_pages=3)
    assert found == {"figures are unaudited"}
    assert is_boilerplate("Figures are unaudited.", found) and not is_boilerplate("Northwind revenue 2021", found)
    assert query_key("  What was Northwind's REVENUE? ") == query_key("what was northwind's revenue")
    answer = '1. What was Northwind\'s Q3 2021 revenue?\n- "How many stores did it open?"\n\n2) 42\nQ3: Headcount 2019'
    assert parse_questions(answer) == ["What was Northwind's Q3 2021 revenue?", "How many stores did it open?",
                                       "Headcount 2019"]
    assert questions_of("\n\n 12 \n", 3)[0] == "no_usable_question"
    assert questions_of("ab cd?\nef gh?\nij kl?", 2) == [("ab cd?", "vlm"), ("ef gh?", "vlm")]


def _pages(n: int) -> list[dict]:
    return [{"key": f"k{i}", "doc_id": f"d{i}", "source": f"s{i}", "page": 1, "text": None} for i in range(n)]


def test_publish_writes_candidates_and_every_reject_with_its_reason(tmp_path):
    cfg = QueriesConfig(min_words=3, max_words=10)
    generated = [
        [("What was Northwind revenue 2021?", "text:x"), ("what was northwind revenue 2021", "text:y"),
         ("too short", "text:x"), ("Figures are unaudited here", "text:x")],
        ("no_text", "the page has no text layer"),
        [],
    ]
    counts = publish(_pages(3), generated, cfg, {"figures are unaudited here"}, str(tmp_path)).to_pylist()[0]
    assert counts == {"pages": 3, "candidates": 1, "query_rejects": 2, "pages_rejected": 2}
    rows = pq.read_table(tmp_path / "generated").to_pylist()
    assert [r["query"] for r in rows if r["reason"] is None] == ["What was Northwind revenue 2021?"], "once a page"
    assert sorted(r["reason"] for r in rows if r["query"] and r["reason"]) == ["boilerplate", "query_too_short"]
    pages = sorted((r["page_key"], r["reason"]) for r in rows if r["query"] is None)
    assert pages == [("k1", "no_text"), ("k2", "no_query")]
    # one part per batch, named by its pages: the same batch again rewrites it, nothing doubles
    publish(_pages(3), generated, cfg, {"figures are unaudited here"}, str(tmp_path))
    assert len(list((tmp_path / "generated").iterdir())) == 1 and pq.read_table(tmp_path / "generated").num_rows == 5


def failing_generator(page: dict) -> list[str]:
    if page["page"] == 2:
        raise RuntimeError("cannot read this one")
    return "not a list" if page["page"] == 3 else [f"What does {page['doc_id']} report for 2021?"]


def test_callable_generator_failures_become_page_rejects(ray_local, tmp_path):
    import pyarrow as pa

    from ray_vdr.queries.generate import load_callable, text_stage

    with pytest.raises(ValueError, match="queries.callable: .* cannot be loaded"):
        load_callable("tests.queries.test_generate:no_such_function")
    cfg = QueriesConfig(generator="callable", callable="tests.queries.test_generate:failing_generator")
    batch = pa.Table.from_pylist([{**p, "page": i + 1, "image": b""} for i, p in enumerate(_pages(3))])
    ref = ray_local.put(set())  # the suite's shared cluster (tests/conftest.py)
    counts = text_stage(batch, cfg=cfg.model_dump(mode="json"), output=str(tmp_path), boilerplate_ref=[ref])
    assert counts.to_pylist()[0]["candidates"] == 1
    rows = pq.read_table(tmp_path / "generated").to_pylist()
    reasons = {r["page_key"]: (r["reason"], r["detail"]) for r in rows if r["query"] is None}
    assert reasons["k1"] == ("generator_failed", "RuntimeError: cannot read this one")
    assert reasons["k2"][0] == "generator_failed" and "not a list of str" in reasons["k2"][1]


def test_vllm_processor_config_for_gpu_clusters():
    """vLLM cannot be installed here (no GPU): the vLLM path is held to the processor config and the messages it
    sends; docs and the GPU config show the rest."""
    import base64

    from ray_vdr.queries.generate import vllm_answer, vllm_messages, vllm_processor_config

    v = VLMGeneratorConfig(model="Qwen/Qwen3-VL-8B-Instruct", replicas=4, tensor_parallel_size=2, batch_size=32,
                           max_tokens=200, temperature=0.5)
    cfg = vllm_processor_config(v)
    assert (cfg.model_source, cfg.concurrency, cfg.batch_size) == ("Qwen/Qwen3-VL-8B-Instruct", 4, 32)
    assert cfg.engine_kwargs["tensor_parallel_size"] == 2 and cfg.engine_kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert cfg.prepare_multimodal_stage["enabled"] and cfg.should_continue_on_error
    row = vllm_messages({"key": "k", "doc_id": "d", "source": "s", "page": 1, "image": b"\x89PNG"}, v, 3)
    content = row["messages"][0]["content"]
    assert content[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    assert "Write 3 different questions" in content[1]["text"] and row["sampling_params"]["max_tokens"] == 200
    assert vllm_answer({**row, "generated_text": "Q?", "__inference_error__": ""})["answer"] == "Q?"
    assert vllm_answer({**row, "__inference_error__": "OOM"}) | {} == {"key": "k", "doc_id": "d", "source": "s",
                                                                      "page": 1, "answer": None, "error": "OOM"}
