from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from ray_vdr.config import ModelConfig
from ray_vdr.models.load import build_model, resolve_attn_implementation, resolve_dtype
from tests.probes import Probes


def test_tiny_qwen_has_the_real_module_stack(tiny_qwen):
    modules = json.loads((tiny_qwen / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((tiny_qwen / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "lasttoken"
    hf = json.loads((tiny_qwen / "config.json").read_text())
    assert hf["model_type"] == "qwen3_vl" and hf["architectures"] == ["Qwen3VLModel"]
    proc = json.loads((tiny_qwen / "processor_config.json").read_text())
    assert proc["processor_class"] == "Qwen3VLProcessor"  # the upstream name: stock processor loads it on CUDA images
    prompts = json.loads((tiny_qwen / "config_sentence_transformers.json").read_text())["prompts"]
    assert set(prompts) >= {"query", "document"}


@pytest.fixture(scope="module")
def fresh(tiny_qwen, tiny_reranker):
    """The two fresh-interpreter probes below, started together."""
    started = Probes({"embedder": (_encode_probe(tiny_qwen),), "reranker": (_rerank_probe(tiny_reranker),)})
    yield started
    started.close()


def _encode_probe(tiny_qwen) -> str:
    return textwrap.dedent(f"""
        import ray_vdr.models.processor as p; p.install_image_only_processor()
        from sentence_transformers import SentenceTransformer
        from PIL import Image
        m = SentenceTransformer({str(tiny_qwen)!r}, device="cpu")
        q = m.encode_query(["What was Northwind's Q3 2021 revenue?"])
        d = m.encode_document([Image.new("RGB", (200, 260), "white")])
        both = m.encode([{{"text": "caption", "image": Image.new("RGB", (64, 64), "red")}}])
        t = SentenceTransformer({str(tiny_qwen)!r}, device="cpu", truncate_dim=16).encode_query(["x"])
        print(sorted(m.modalities), q.shape, d.shape, both.shape, t.shape, round(float((q * q).sum()), 3))
    """)


def test_fresh_process_loads_and_encodes_text_and_images(fresh):
    """SentenceTransformer(path) in a new interpreter; ray_vdr is imported only for the torchvision-less processor."""
    out = fresh.result("embedder", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['image', 'message', 'text'] (1, 64) (1, 64) (1, 64) (1, 16) 1.0"


def test_tiny_reranker_has_the_real_module_stack(tiny_reranker):
    from tokenizers import Tokenizer

    modules = json.loads((tiny_reranker / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "LogitScore"]
    st_module = json.loads((tiny_reranker / "sentence_bert_config.json").read_text())
    assert st_module["transformer_task"] == "any-to-any" and st_module["module_output_name"] == "causal_logits"
    hf = json.loads((tiny_reranker / "config.json").read_text())
    assert hf["model_type"] == "qwen3_vl" and hf["architectures"] == ["Qwen3VLForConditionalGeneration"]
    score = json.loads((tiny_reranker / modules[1]["path"] / "config.json").read_text())
    tok = Tokenizer.from_file(str(tiny_reranker / "tokenizer.json"))
    # "yes" and "no" are single ordinary BPE tokens inside the configured vocabulary, as in Qwen's tokenizer
    assert tok.encode("yes").ids == [score["true_token_id"]] and tok.encode("no").ids == [score["false_token_id"]]
    assert score["true_token_id"] != score["false_token_id"]
    assert max(score["true_token_id"], score["false_token_id"]) < hf["text_config"]["vocab_size"] == 512
    ce = json.loads((tiny_reranker / "config_sentence_transformers.json").read_text())
    assert ce["model_type"] == "CrossEncoder" and ce["activation_fn"] == "torch.nn.modules.activation.Sigmoid"
    assert '"yes" or "no"' in ce["prompts"][ce["default_prompt_name"]]


def _rerank_probe(tiny_reranker) -> str:
    return textwrap.dedent(f"""
        import json
        import numpy as np
        import ray_vdr.models.processor as p; p.install_image_only_processor()
        from sentence_transformers import CrossEncoder
        from PIL import Image
        m = CrossEncoder({str(tiny_reranker)!r}, device="cpu")
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        pages = [Image.new("RGB", (192, 256), "white"), Image.new("RGB", (256, 192), "black"),
                 Image.fromarray(noise), Image.new("RGB", (300, 120), (200, 30, 30))]
        queries = ["What was Northwind's Q3 2021 revenue?", "How many employees?"]
        pairs = [(q, page) for q in queries for page in pages]
        rendered = m[0].tokenizer.decode(m[0].preprocess(pairs[:1], prompt=m.prompts["rerank"])["input_ids"][0])
        batched = m.predict(pairs, batch_size=4)
        alone = np.array([m.predict([pair], batch_size=1)[0] for pair in pairs])
        ranked = m.rank(queries[0], pages)
        print(json.dumps({{"rendered": rendered, "batched": batched.tolist(), "alone": alone.tolist(),
                          "ranked": ranked}}))
    """)


def test_fresh_process_reranks_text_image_pairs(fresh):
    """CrossEncoder(path) in a new interpreter scores (query, page image) pairs; a pair's score does not depend on
    the batch it is in (the serving endpoint batches requests dynamically)."""
    out = fresh.result("reranker", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rendered"].startswith('<|im_start|>system\nJudge whether')
    assert res["rendered"].endswith("<|im_start|>user\n<Query>: What was Northwind's Q3 2021 revenue?\n<Document>: "
                                    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|><|im_end|>\n"
                                    "<|im_start|>assistant\n")
    batched, alone = np.array(res["batched"]), np.array(res["alone"])
    assert batched.shape == (8,) and np.isfinite(batched).all() and ((batched > 0) & (batched < 1)).all()
    gaps = np.abs(batched[:, None] - batched[None, :])[~np.eye(8, dtype=bool)]
    assert gaps.min() > 1e-6  # every query and every page reach the score (fp32 batching noise is ~1e-7)
    assert np.abs(batched - alone).max() < 1e-4
    assert sorted(r["corpus_id"] for r in res["ranked"]) == [0, 1, 2, 3]
    assert [r["score"] for r in res["ranked"]] == sorted((r["score"] for r in res["ranked"]), reverse=True)
    for r in res["ranked"]:
        assert abs(r["score"] - batched[r["corpus_id"]]) < 1e-4


def test_prompts_change_the_embedding(tiny_qwen):
    m = build_model(ModelConfig(name_or_path=str(tiny_qwen)), device="cpu")
    q = m.encode_query(["revenue"], convert_to_tensor=True)
    d = m.encode_document(["revenue"], convert_to_tensor=True)
    assert (q - d).abs().max() > 1e-4


def test_pixel_bounds_cap_image_tokens(tiny_qwen):
    page = Image.new("RGB", (600, 800), "white")
    tokens = {}
    for max_pixels in (64 * 64, 256 * 256):
        m = build_model(ModelConfig(name_or_path=str(tiny_qwen), max_pixels=max_pixels), device="cpu")
        grid = m[0].preprocess([page])["image_grid_thw"][0]
        tokens[max_pixels] = int(grid.prod()) // 4  # merge 2x2
    assert tokens[64 * 64] <= 4 < tokens[256 * 256]


def test_tiny_clip_encodes_both_modalities(tiny_clip):
    m = build_model(ModelConfig(name_or_path=str(tiny_clip)), device="cpu")
    assert set(m.modalities) >= {"text", "image"}
    assert m.encode(["a page"]).shape == m.encode([Image.new("RGB", (50, 50))]).shape == (1, 16)
    with pytest.raises(ValueError, match="Qwen-VL style"):
        build_model(ModelConfig(name_or_path=str(tiny_clip), max_pixels=4096), device="cpu")


def test_builder_config_builds_once(tmp_path):
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), builder="tiny-clip")
    m = build_model(cfg, device="cpu")
    stamp = (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns
    build_model(cfg, device="cpu")
    assert (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "m" / "ray_vdr_build.json").read_text())["random_weights"] is True
    assert m.encode(["x"]).shape == (1, 16)


@pytest.mark.parametrize("shape,params,vision,dim", [("QWEN3VL_2B_SHAPE", 2_127_532_032, 406_957_056, 2048),
                                                      ("QWEN3VL_8B_SHAPE", 8_144_793_840, 576_388_336, 4096)])
def test_qwen3vl_real_shapes_match_the_public_models(shape, params, vision, dim):
    """The random-weight GPU benchmark models have the public 2B and 8B parameter counts without the LM head (counted
    on the meta device, no memory); the README's ZeRO memory arithmetic uses these counts."""
    import torch
    from transformers import Qwen3VLModel

    from ray_vdr.models import qwen3vl

    tok = qwen3vl.qwen_tokenizer(512)
    s = getattr(qwen3vl, shape)
    config = qwen3vl.qwen3vl_config(s, tok, s.vocab_size)
    with torch.device("meta"):
        model = Qwen3VLModel(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.visual.parameters()) == vision
    assert config.text_config.hidden_size == dim and config.vision_config.out_hidden_size == dim


def test_auto_resolution_on_cpu():
    import torch

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    with pytest.raises(RuntimeError, match="flash_attn is not installed"):
        resolve_attn_implementation("flash_attention_2", "cuda")
