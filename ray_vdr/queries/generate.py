"""The query generators and the stage that filters and publishes what they write, per batch of pages.

Generators (``queries.generator``):

- ``text`` (:func:`text_stage`): spans of the page's own text layer (ray_vdr/queries/text.py), in CPU tasks;
- ``callable`` (:func:`text_stage` too): the user's ``module:function(page) -> list[str]``;
- ``vlm``: a generative VLM writes questions from the page image — :class:`VLMGenerator` (transformers
  ``generate`` in an actor pool: CPU, or GPU without vLLM) or :func:`vllm_processor` (Ray Data LLM batch inference
  with the vLLM engine, GPU); both hand the model's answer to :func:`publish_answers`.

Whatever the generator, :func:`publish` applies the per-query filters (length, boilerplate, repeats on the page) and
publishes the batch as one part under ``generated/``, named by its pages' keys: every query it kept (``reason``
null) or rejected (with the reason), and a row for each page that yielded no query at all (``query`` null: no_text,
no_usable_question, generator_failed, no_query). One atomic file per batch: a page is done when it is in a part,
and a retried batch rewrites the same file.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from ray_vdr.cluster import fetch_once
from ray_vdr.config import ConfigError, QueriesConfig, VLMGeneratorConfig
from ray_vdr.queries.filters import is_boilerplate, length_problem, parse_questions, per_page_unique
from ray_vdr.queries.text import text_queries
from ray_vdr.storage import part_name, write_table

logger = logging.getLogger(__name__)

__all__ = ["GENERATED", "REJECTS", "ROW_SCHEMA", "VLMGenerator",
           "ensure_generator", "load_callable", "publish", "publish_answers", "query_row_id", "text_stage",
           "vllm_processor", "vllm_processor_config"]

GENERATED = "generated"  # what generation made of each page: queries kept or rejected, or why there is none
REJECTS = "rejects"  # queries rejected after generation: duplicate_query, inconsistent, too_few_negatives
# A generated query (reason null: a candidate), a query rejected (reason set), or a page without any (query null);
# ``stage`` says which stage decided.
ROW_SCHEMA = pa.schema([("row_id", pa.string()), ("page_key", pa.string()), ("doc_id", pa.string()),
                        ("page", pa.int32()), ("source", pa.string()), ("query", pa.string()),
                        ("query_source", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                        ("detail", pa.string())])


def query_row_id(page_key: str, query: str) -> str:
    """A generated row's id: its page and its query (the same page and query are the same row on every run)."""
    return hashlib.blake2b(f"{page_key}\0{query}".encode(), digest_size=12).hexdigest()


def _row(page: dict, query: str | None, source: str | None = None, reason: str | None = None,
         detail: str | None = None) -> dict[str, Any]:
    return {"row_id": query_row_id(page["key"], query or ""), "page_key": page["key"], "doc_id": page["doc_id"],
            "page": page["page"], "source": page["source"], "query": query, "query_source": source,
            "stage": "generate", "reason": reason, "detail": detail[:500] if detail else None}


def publish(pages: list[dict], generated: list[list[tuple[str, str]] | tuple[str, str]], cfg: QueriesConfig,
            boilerplate: set[str], output: str) -> pa.Table:
    """Filter each page's generated (query, source) pairs — or take its (reason, detail) when the generator
    produced nothing — and publish the batch as one part of ``generated/``. Returns one row of counts."""
    rows: list[dict[str, Any]] = []
    counts = {"pages": len(pages), "candidates": 0, "query_rejects": 0, "pages_rejected": 0}
    for page, got in zip(pages, generated, strict=True):
        if isinstance(got, tuple):  # the generator made nothing for this page: why
            rows.append(_row(page, None, reason=got[0], detail=got[1]))
            counts["pages_rejected"] += 1
            continue
        if not got:
            rows.append(_row(page, None, reason="no_query", detail="the generator found nothing to ask on this page"))
            counts["pages_rejected"] += 1
        for query, source in per_page_unique(got):
            query = " ".join(query.split())
            problem = length_problem(query, min_words=cfg.min_words, max_words=cfg.max_words,
                                     max_chars=cfg.max_chars)
            if problem is None and is_boilerplate(query, boilerplate):
                problem = ("boilerplate", "the query repeats text found on many pages")
            rows.append(_row(page, query, source, *(problem or (None, None))))
            counts["query_rejects" if problem else "candidates"] += 1
    name = part_name([p["key"] for p in pages])
    write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), f"{output}/{GENERATED}/{name}")
    return pa.table({k: [v] for k, v in counts.items()})


# ---------------------------------------------------------------------------------------------------------------------
# text and callable: CPU tasks


def load_callable(path: str) -> Callable[[dict], list[str]]:
    """``module:function`` → the function (raises ConfigError naming what is missing)."""
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"invalid configuration:\n  queries.callable: {path!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError(f"invalid configuration:\n  queries.callable: {path!r} is not callable")
    return fn


def _call(fn, page: dict) -> list[tuple[str, str]] | tuple[str, str]:
    try:
        out = fn(page)
    except Exception as e:  # the user's code: record the page, never fail the job for it
        return "generator_failed", f"{type(e).__name__}: {e}"
    if not isinstance(out, list | tuple) or not all(isinstance(q, str) for q in out):
        return "generator_failed", f"the callable returned {type(out).__name__}, not a list of str"
    return [(q, "callable") for q in out]


def text_stage(batch: pa.Table, *, cfg: dict, output: str, boilerplate_ref: list) -> pa.Table:
    """map_batches stage of the text and callable generators: generate, filter, publish; returns counts."""
    q = QueriesConfig.model_validate(cfg)
    boilerplate = fetch_once(boilerplate_ref[0])
    pages = batch.to_pylist()
    start = time.perf_counter()
    if q.generator == "text":
        generated = []
        for page in pages:
            if not (page.get("text") or "").strip():
                generated.append(("no_text", "the page has no text layer (a scan?): the text generator needs one"))
                continue
            spans = text_queries(page["text"], n=q.per_page, seed=f"{q.seed}:{page['key']}", boilerplate=boilerplate,
                                 kinds=q.text_kinds)
            generated.append([(text, f"text:{kind}") for text, kind in spans])
    else:
        fn = load_callable(q.callable)
        generated = [_call(fn, page) for page in pages]
    counts = publish(pages, generated, q, boilerplate, output)
    return counts.append_column("seconds", pa.array([time.perf_counter() - start]))


# ---------------------------------------------------------------------------------------------------------------------
# vlm: the prompt, the answer, and the two engines


def vlm_prompt(v: VLMGeneratorConfig, n: int) -> str:
    return v.prompt.replace("{n}", str(n))


def questions_of(answer: str | None, n: int) -> list[tuple[str, str]] | tuple[str, str]:
    """The questions in a VLM's answer, or why there are none (the answer's start, for the reject record)."""
    questions = parse_questions(answer)
    if not questions:
        return "no_usable_question", f"answer: {(answer or '')[:300]!r}"
    return [(q, "vlm") for q in questions[:n]]


def publish_answers(batch: pa.Table, *, cfg: dict, output: str, boilerplate_ref: list) -> pa.Table:
    """map_batches stage after a VLM: its answers (column ``answer``) → questions → filters → published parts."""
    q = QueriesConfig.model_validate(cfg)
    rows = batch.to_pylist()
    pages = [{k: r[k] for k in ("key", "doc_id", "source", "page")} for r in rows]
    generated = [questions_of(r.get("answer"), q.per_page) if not r.get("error") else ("generator_failed", r["error"])
                 for r in rows]
    counts = publish(pages, generated, q, fetch_once(boilerplate_ref[0]), output)
    return counts.append_column("seconds", pa.array([0.0]))


class VLMGenerator:
    """Actor-pool stage: a generative VLM (transformers) answers the question prompt for a batch of page images;
    returns the pages with their ``answer`` (or ``error``)."""

    def __init__(self, cfg: dict, use_gpu: bool):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ray_vdr.cluster import worker_device, worker_logging
        from ray_vdr.models.load import local_model, resolve_dtype
        from ray_vdr.models.processor import install_image_only_processor

        worker_logging()
        self.cfg = QueriesConfig.model_validate(cfg)
        v = self.cfg.vlm
        self.device = worker_device(use_gpu, v.cpus_per_actor)
        install_image_only_processor()
        path = local_model(v.model)
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # generation continues each prompt at its end
        if hasattr(self.processor, "image_processor") and hasattr(self.processor.image_processor, "size"):
            size = dict(self.processor.image_processor.size or {})
            size["longest_edge"] = min(size.get("longest_edge", v.max_pixels), v.max_pixels)
            self.processor.image_processor.size = size
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=resolve_dtype(v.dtype, self.device))
        self.model.to(self.device).eval()
        self.torch = torch

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        v = self.cfg.vlm
        prompt = vlm_prompt(v, self.cfg.per_page)
        answers: list[str | None] = [None] * len(rows)
        errors: list[str | None] = [None] * len(rows)
        try:
            messages = [[{"role": "user", "content": [
                {"type": "image", "image": Image.open(io.BytesIO(r["image"])).convert("RGB")},
                {"type": "text", "text": prompt}]}] for r in rows]
            inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt",
                                                        processor_kwargs={"padding": True})
            inputs = inputs.to(self.device)
            with self.torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=v.max_tokens, do_sample=v.temperature > 0,
                                          temperature=v.temperature or None, top_p=None, top_k=None)
            answers = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        except Exception as e:  # one failing batch must not stop the job: its pages are rejected with the reason
            logger.warning("VLM generation failed for a batch of %d pages: %s", len(rows), e)
            errors = [f"{type(e).__name__}: {e}"[:500]] * len(rows)
        return pa.table({"key": [r["key"] for r in rows], "doc_id": [r["doc_id"] for r in rows],
                         "source": [r["source"] for r in rows], "page": pa.array([r["page"] for r in rows], pa.int32()),
                         "answer": pa.array(answers, pa.string()), "error": pa.array(errors, pa.string())})


def ensure_generator(v: VLMGeneratorConfig) -> None:
    """Build the tiny random-weight VLM when ``builder`` asks for one and it is missing (in the driver, once)."""
    from pathlib import Path

    from filelock import FileLock

    if v.builder == "load" or (Path(v.model) / "config.json").is_file():
        return
    from ray_vdr.models.builders import build_qwen3vl_generator

    Path(v.model).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(v.model + ".lock"):
        if not (Path(v.model) / "config.json").is_file():
            logger.info("building a tiny random-weight Qwen3-VL chat model at %s", v.model)
            build_qwen3vl_generator(v.model)


def vllm_processor_config(v: VLMGeneratorConfig):
    """The Ray Data LLM (vLLM engine) processor config for ``queries.vlm``: one engine per replica on
    ``tensor_parallel_size`` GPUs, multimodal preprocessing, detokenised answers."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=v.model,
        batch_size=v.batch_size,
        concurrency=v.replicas,
        engine_kwargs={"tensor_parallel_size": v.tensor_parallel_size, "max_model_len": v.max_model_len,
                       "limit_mm_per_prompt": {"image": 1}, "dtype": v.dtype},
        prepare_multimodal_stage={"enabled": True, "model_config_kwargs": {"model": v.model,
                                                                          "limit_mm_per_prompt": {"image": 1}}},
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
        should_continue_on_error=True,
    )


def vllm_messages(row: dict, v: VLMGeneratorConfig, n: int) -> dict[str, Any]:
    """The preprocess of :func:`vllm_processor`: the page as an OpenAI-style chat message with the image inline (a
    data URL: the engine never fetches anything), and the sampling parameters."""
    url = "data:image/png;base64," + base64.b64encode(row["image"]).decode()
    return {"key": row["key"], "doc_id": row["doc_id"], "source": row["source"], "page": row["page"],
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": vlm_prompt(v, n)}]}],
            "sampling_params": {"temperature": v.temperature, "max_tokens": v.max_tokens}}


def vllm_answer(row: dict) -> dict[str, Any]:
    """The postprocess of :func:`vllm_processor`: the page and the generated text (or the engine's error)."""
    error = row.get("__inference_error__") or None
    return {"key": row["key"], "doc_id": row["doc_id"], "source": row["source"], "page": row["page"],
            "answer": None if error else row.get("generated_text"), "error": error}


def vllm_processor(v: VLMGeneratorConfig, n: int):
    """A Ray Data LLM processor: page rows (key, doc_id, source, page, image) → (…, answer, error)."""
    from ray.data.llm import build_processor

    return build_processor(vllm_processor_config(v), preprocess=lambda row: vllm_messages(row, v, n),
                           postprocess=vllm_answer)
