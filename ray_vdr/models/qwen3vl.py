"""Qwen3-VL parts for models built locally with random weights: shapes (tiny, 2B, 8B), chat templates, a byte-level
BPE tokenizer trained offline with the Qwen special tokens, the config, the PIL image processor, and the backbone
folder they make together (:func:`save_qwen3vl_backbone`). The builders in :mod:`ray_vdr.models.builders` assemble
them into Sentence Transformers models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["CORPUS", "DEFAULT_DOCUMENT_PROMPT", "DEFAULT_QUERY_PROMPT", "DEFAULT_RERANK_PROMPT", "QWEN3VL_2B_SHAPE",
           "QWEN3VL_8B_SHAPE", "QWEN3VL_CHAT_TEMPLATE", "QWEN3VL_RERANK_CHAT_TEMPLATE", "RERANK_FALSE_TOKEN",
           "RERANK_TRUE_TOKEN", "TINY_QWEN3VL", "Qwen3VLShape", "qwen3vl_config", "qwen_tokenizer",
           "save_qwen3vl_backbone"]

# The instruction Qwen3-VL-Embedding uses by default; prompts travel as system messages.
DEFAULT_QUERY_PROMPT = "Retrieve images or text relevant to the user's query."
DEFAULT_DOCUMENT_PROMPT = "Represent the user's input."
# The reranker's judge instruction (a system message, the CrossEncoder's default prompt); the answer is read from the
# logits of the "yes" and "no" tokens.
DEFAULT_RERANK_PROMPT = 'Judge whether the Document answers the Query. Note that the answer can only be "yes" or "no".'
RERANK_TRUE_TOKEN = "yes"
RERANK_FALSE_TOKEN = "no"

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _content_jinja(content: str) -> str:
    """Jinja that renders one message's content (a string, or text and image items as Qwen3-VL does)."""
    return (
        f"{{%- if {content} is string -%}}{{{{- {content} -}}}}"
        f"{{%- else -%}}{{%- for item in {content} -%}}"
        "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )


# A chat template with the same rendering as Qwen3-VL's for text and image items (no tools, no video).
QWEN3VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    + _content_jinja("message['content']")
    + "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The Qwen3-VL-Reranker layout: Sentence Transformers turns a pair into a "query" and a "document" message (and the
# prompt into a system message); both land in one user turn, "<Query>: ...\n<Document>: ...", and the model answers
# yes or no after the assistant header. Other roles render as in QWEN3VL_CHAT_TEMPLATE.
QWEN3VL_RERANK_CHAT_TEMPLATE = (
    "{%- for message in messages if message['role'] not in ['query', 'document'] -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    + _content_jinja("message['content']")
    + "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- set pair = messages | selectattr('role', 'in', ['query', 'document']) | list -%}"
    "{%- if pair -%}{{- '<|im_start|>user\\n' -}}"
    "{%- for message in pair -%}"
    "{{- ('<Query>: ' if message['role'] == 'query' else '<Document>: ') -}}"
    + _content_jinja("message['content']")
    + "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CORPUS = [
    "What was the revenue in Q1 Q2 Q3 Q4 of 2019 2020 2021 2022 2023 2024?",
    "How many employees stores users customers did the company report hire open?",
    "Operating income net profit headcount segment cloud devices services consumer enterprise licensing advertising",
    "January February March April May June July August September October November December monthly active users",
    "Annual report quarterly results memo highlights confidential page table chart figure summary million dollars",
    "Northwind Contoso Fabrikam Tailspin Wingtip Litware Proseware Woodgrove Alpine Logistics Foods Energy Robotics",
    "Represent the user's input. Retrieve images or text relevant to the user's query.",
    "the of and to in is was for on with as by at from that this which customer satisfaction score percent",
    "0 1 2 3 4 5 6 7 8 9 10 25 50 75 100 $ % . , ? ! : ; - ( ) ' \"",
]


@dataclass
class Qwen3VLShape:
    """Every dimension of a Qwen3-VL backbone (text decoder + vision tower)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    tie_word_embeddings: bool = True
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_heads: int = 2
    patch_size: int = 16
    spatial_merge_size: int = 2
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [1])
    max_position_embeddings: int = 4096


TINY_QWEN3VL = Qwen3VLShape()

# Qwen3-VL-2B (public config): embedding dim 2048.
QWEN3VL_2B_SHAPE = Qwen3VLShape(
    vocab_size=151936,
    hidden_size=2048,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=6144,
    mrope_section=[24, 20, 20],
    tie_word_embeddings=True,
    vision_depth=24,
    vision_hidden_size=1024,
    vision_intermediate_size=4096,
    vision_num_heads=16,
    patch_size=16,
    spatial_merge_size=2,
    deepstack_visual_indexes=[5, 11, 17],
    max_position_embeddings=262144,
)

# Qwen3-VL-8B (public config): embedding dim 4096; 8.14 B parameters without the LM head (2B: 2.13 B).
QWEN3VL_8B_SHAPE = replace(
    QWEN3VL_2B_SHAPE,
    hidden_size=4096,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=12288,
    tie_word_embeddings=False,
    vision_depth=27,
    vision_hidden_size=1152,
    vision_intermediate_size=4304,
    deepstack_visual_indexes=[8, 16, 24],
)


def _train_bpe(vocab_size: int, specials: list[str], corpus: list[str]):
    """A byte-level BPE trained on ``corpus``: deterministic, offline, ~0.1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def _add_bpe_words(raw, words: tuple[str, ...]):
    """Make each word one token of a byte-level BPE by appending merges (at the lowest priority) to its model.

    Like Qwen's "yes" and "no", the words stay ordinary vocabulary (no added-token matching inside other text). The
    new merges rank last, so they apply only where no learned merge does (e.g. "not" now splits as "no" + "t").
    """
    from tokenizers import Tokenizer

    state = json.loads(raw.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    pair_as_list = not merges or isinstance(merges[0], list)
    for word in words:
        pieces = raw.encode(word, add_special_tokens=False).tokens
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append([merged, piece] if pair_as_list else f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, max(vocab.values()) + 1)
    return Tokenizer.from_str(json.dumps(state))


def qwen_tokenizer(vocab_size: int, words: tuple[str, ...] = (), chat_template: str = QWEN3VL_CHAT_TEMPLATE):
    """The Qwen-style tokenizer; ``words`` become single tokens within ``vocab_size`` (for the reranker's yes/no)."""
    from transformers import PreTrainedTokenizerFast

    raw = _train_bpe(vocab_size - len(words), _QWEN_SPECIALS, CORPUS)
    if words:
        raw = _add_bpe_words(raw, words)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=_QWEN_SPECIALS[1:],
        model_max_length=4096,
        padding_side="left",
    )
    tok.chat_template = chat_template
    return tok


def qwen3vl_config(shape: Qwen3VLShape, tokenizer, vocab_size: int, architecture: str = "Qwen3VLModel"):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    text = {
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": shape.mrope_section,
                            "mrope_interleaved": True},
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": shape.tie_word_embeddings,
    }
    vision = {
        "depth": shape.vision_depth,
        "hidden_size": shape.vision_hidden_size,
        "intermediate_size": shape.vision_intermediate_size,
        "num_heads": shape.vision_num_heads,
        "patch_size": shape.patch_size,
        "spatial_merge_size": shape.spatial_merge_size,
        "temporal_patch_size": 2,
        "out_hidden_size": shape.hidden_size,
        "deepstack_visual_indexes": shape.deepstack_visual_indexes,
        "num_position_embeddings": 2304,
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=shape.tie_word_embeddings,
        architectures=[architecture],
    )


def _qwen_image_processor(patch: int, merge: int, min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def save_qwen3vl_backbone(hf_dir: Path, shape: Qwen3VLShape, architecture: str, *, chat_template: str,
                           min_pixels: int, max_pixels: int, dtype: str, seed: int, words: tuple[str, ...] = ()):
    """Write a random-weight transformers Qwen3-VL folder (``architecture``, tokenizer, image-only processor with
    ``chat_template``) to ``hf_dir`` and return the tokenizer."""
    import torch
    import transformers

    from ray_vdr.models.processor import Qwen3VLProcessor

    tokenizer = qwen_tokenizer(shape.vocab_size, words, chat_template)
    vocab_size = max(shape.vocab_size, len(tokenizer))
    config = qwen3vl_config(shape, tokenizer, vocab_size, architecture)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = getattr(transformers, architecture)(config).to(getattr(torch, dtype))
    image_processor = _qwen_image_processor(shape.patch_size, shape.spatial_merge_size, min_pixels, max_pixels)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    model.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)
    _add_video_processor(Path(hf_dir), shape)
    return tokenizer


def _add_video_processor(hf_dir: Path, shape: Qwen3VLShape) -> None:
    """Give the saved processor the video part the public Qwen3-VL folders have (built here without torchvision, the
    image-only processor saves none): where torchvision exists (CUDA images) the stock processor loads the folder
    and needs it. Its values are upstream's defaults with this shape's patch sizes; videos are never embedded."""
    import json

    path = hf_dir / "processor_config.json"
    config = json.loads(path.read_text())
    image = config.get("image_processor", {})
    config.setdefault("video_processor", {
        "video_processor_type": "Qwen3VLVideoProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "do_sample_frames": True, "fps": 2, "min_frames": 4,
        "max_frames": 768, "image_mean": image.get("image_mean", [0.5, 0.5, 0.5]),
        "image_std": image.get("image_std", [0.5, 0.5, 0.5]), "merge_size": shape.spatial_merge_size,
        "patch_size": shape.patch_size, "temporal_patch_size": image.get("temporal_patch_size", 2), "resample": 3,
        "rescale_factor": 1 / 255, "return_metadata": False,
        "size": {"longest_edge": 25165824, "shortest_edge": 4096}})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
