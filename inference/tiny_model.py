"""A tiny GLM-4.6V-style checkpoint for tests and the offline demo, built with no download.

``build_tiny_model(out_dir)`` writes a folder laid out like a real GLM-4.6V-Flash checkpoint:

- ``config.json`` / ``model.safetensors`` / ``generation_config.json``: a
  ``Glm4vForConditionalGeneration`` with the real architecture at toy size (2 text layers,
  hidden 64, 4 heads, 2 KV heads, partial rotary 0.5, M-RoPE sections [1, 1, 2]; a depth-2
  vision tower with patch 14, spatial merge 2, temporal patch 2);
- ``tokenizer.json`` / ``tokenizer_config.json`` / ``chat_template.jinja``: a byte-level BPE
  trained here on a small built-in English + Chinese corpus, so most Chinese characters span
  several tokens, with the GLM special tokens appended after the learnt vocabulary (as in the
  real tokenizer, where they sit at 151329+) and a GLM-4.6V-style chat template;
- ``preprocessor_config.json`` / ``video_preprocessor_config.json`` /
  ``processor_config.json``: the GLM-4.6V image processor settings and processor class.

Honesty note on the weights: the vision tower is random. The text model starts random and is
then trained for a few hundred steps on chat-formatted samples of the same corpus, because a
purely random model emits arbitrary byte tokens (invalid UTF-8, never an EOS) and would make
the streaming and stop tests vacuous. Nothing is learnt about images. Output is deterministic
for a given ``seed`` on a given machine (single-threaded CPU training).

This module imports no Django: the management command ``make_tiny_model`` is a thin wrapper.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported where used: importing this module loads neither
    from tokenizers import Tokenizer
    from transformers import (
        Glm4vForConditionalGeneration,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

# Order copied from the GLM-4 tokenizer (151329 = <|endoftext|> ... 151343 = <|image|>);
# here they start right after the learnt BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
]
# GLM tokenizers add the think tags as non-special added tokens.
THINK_TOKENS = ["<think>", "</think>"]
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

CHAT_TEMPLATE = (
    # Every literal is an expression so that whitespace control never eats a newline.
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' -%}{{- '<|begin_of_image|><|image|><|end_of_image|>' -}}"
    "{%- elif item.type == 'video' -%}{{- '<|begin_of_video|><|video|><|end_of_video|>' -}}"
    "{%- elif item.type == 'text' -%}{{- item.text -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- '[gMASK]<sop>' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- '<|system|>\\n' + render(message.content) -}}"
    "{%- elif message.role == 'user' -%}{{- '<|user|>\\n' + render(message.content) -}}"
    # History turns keep no reasoning, as in the GLM-4.5/4.6 templates.
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|assistant|>\\n<think></think>\\n' + render(message.content) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- '<think></think>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# (question, reasoning, answer) triples; Chinese ones make multi-byte characters common.
_SAMPLES = [
    ("What is in the image?", "I look at the picture.", "A red cat sits on the table."),
    ("Describe the picture.", "The colours are bright.", "Two dogs run in a green park."),
    ("How many apples are there?", "I count them one by one.", "There are three apples."),
    ("What colour is the car?", "The car is near the road.", "The car is blue."),
    ("Is it day or night?", "The sky is light.", "It is a sunny day."),
    ("What is the man doing?", "He holds a book.", "The man is reading a book."),
    ("Read the sign.", "The letters are large.", "The sign says STOP."),
    ("Where is the bird?", "I look at the tree.", "The bird is on the tree."),
    ("图片里有什么？", "我仔细看这张图片。", "图片里有一只红色的猫坐在桌子上。"),
    ("描述这张照片。", "颜色很鲜艳。", "两只小狗在绿色的公园里奔跑。"),
    ("有几个苹果？", "我一个一个地数。", "一共有三个苹果。"),
    ("汽车是什么颜色的？", "汽车停在路边。", "汽车是蓝色的。"),
    ("现在是白天还是晚上？", "天空很明亮。", "现在是晴朗的白天。"),
    ("这个人在做什么？", "他手里拿着一本书。", "这个人正在看书。"),
    ("天气怎么样？", "我看看窗外。", "天气很好，我们去公园散步吧。"),
    ("这是哪里？", "我看到了高山和河流。", "这是一个美丽的山谷，风景如画。"),
]
_SYSTEMS = ["You are a helpful assistant.", "你是一个乐于助人的助手。"]


def _corpus() -> list[str]:
    lines = [text for sample in _SAMPLES for text in sample]
    return lines + _SYSTEMS


def _build_tokenizer(vocab_size: int) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def _wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )


def _training_texts(rng: random.Random) -> list[str]:
    """Chat-formatted samples in both thinking modes, each ended by ``<|user|>`` (an EOS)."""
    texts = []
    for question, reasoning, answer in _SAMPLES:
        for thinking in (True, False):
            system = f"<|system|>\n{rng.choice(_SYSTEMS)}" if rng.random() < 0.3 else ""
            head = f"[gMASK]<sop>{system}<|user|>\n{question}<|assistant|>\n"
            if thinking:
                body = f"<think>{reasoning}</think>\n{answer}"
            else:
                body = f"<think></think>\n{answer}"
            texts.append(head + body + "<|user|>")
    return texts


def _train_text_model(
    model: Glm4vForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    seed: int,
) -> None:
    """A short next-token training of the text stack so greedy output is not noise."""
    rng = random.Random(seed)
    texts = _training_texts(rng)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randperm(len(encoded), generator=generator)[:16]
        out = model(input_ids=input_ids[batch], attention_mask=mask[batch], labels=labels[batch])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()


def tiny_config_dict(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict[str, Any]:
    """The ``Glm4vConfig`` arguments of the tiny model; token ids are read from ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos = [ids[t] for t in EOS_TOKENS]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        # head_dim 16 * partial_rotary_factor 0.5 / 2 = 4 = sum(mrope_section)
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [1, 1, 2],
        },
        "eos_token_id": eos,
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "image_size": 336,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
    }
    return {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
        "tie_word_embeddings": False,
    }


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_steps: int = 300,
    init_std: float | None = None,
    bpe_vocab_size: int = 480,
) -> Path:
    """Write the tiny checkpoint into ``out_dir`` (created if missing) and return its path.

    Deterministic for a given ``seed`` on one machine. ``train_steps=0`` leaves the model
    purely random; with ``init_std`` around 0.3 (instead of the config's 0.02, which gives
    near-uniform logits and a repeated token) a random model's greedy output is chaotic:
    every change of inputs, positions or numerics shows in its tokens, which is what the
    engine's exactness test wants.
    """
    from transformers import (
        GenerationConfig,
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vTextConfig,
        Glm4vVisionConfig,
        Glm46VImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _wrap_tokenizer(_build_tokenizer(bpe_vocab_size))
    # Like the real checkpoint (151552 rows for ~151365 tokens), pad the embedding table.
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    config = Glm4vConfig(**tiny_config_dict(tokenizer, vocab_size))
    # Declared dict | config | None: Glm4vConfig has made config objects of the dicts.
    text_config, vision_config = config.text_config, config.vision_config
    assert isinstance(text_config, Glm4vTextConfig)
    assert isinstance(vision_config, Glm4vVisionConfig)
    if init_std is not None:
        text_config.initializer_range = init_std
        vision_config.initializer_range = init_std
    config.architectures = ["Glm4vForConditionalGeneration"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one thread: same bytes on every run
    try:
        torch.manual_seed(seed)
        model = Glm4vForConditionalGeneration(config)
        # In place, like every Module.to. PreTrainedModel.to is decorated with functools.wraps,
        # and typeshed's _Wrapped has no __get__: mypy takes the dtype for self
        # (python/typeshed#10653).
        model.to(torch.float32)  # type: ignore[arg-type]
        if train_steps:
            _train_text_model(model, tokenizer, steps=train_steps, seed=seed)
    finally:
        torch.set_num_threads(threads)

    eos = text_config.eos_token_id
    model.generation_config = GenerationConfig(
        eos_token_id=eos,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor = Glm46VImageProcessorPil()
    image_processor.save_pretrained(out)
    _write_json(
        out / "preprocessor_config.json",
        {
            **json.loads((out / "preprocessor_config.json").read_text()),
            "image_processor_type": "Glm46VImageProcessor",
        },
    )
    _write_json(out / "processor_config.json", {"processor_class": "Glm46VProcessor"})
    _write_json(
        out / "video_preprocessor_config.json",
        {
            "video_processor_type": "Glm46VVideoProcessor",
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
        },
    )
    return out


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
