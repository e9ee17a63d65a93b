"""The tiny checkpoint loads like a real GLM-4.6V-Flash one and keeps its conventions."""

from __future__ import annotations

import hashlib
import json

from inference.engine.prompt import PromptBuilder
from inference.protocol import ImagePart, ImageRef, Message, TextPart
from inference.tiny_model import build_tiny_model
from tests.inference.conftest import image_bytes


def test_checkpoint_loads_with_transformers(tiny_model_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, Glm4vForConditionalGeneration

    model = Glm4vForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    config = model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image|>")
    assert config.image_start_token_id == tokenizer.convert_tokens_to_ids("<|begin_of_image|>")
    assert config.image_end_token_id == tokenizer.convert_tokens_to_ids("<|end_of_image|>")
    eos = {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    }
    assert set(model.generation_config.eos_token_id) == eos
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    rope = text.rope_parameters
    assert sum(rope["mrope_section"]) == head_dim * rope["partial_rotary_factor"] / 2
    assert (config.vision_config.patch_size, config.vision_config.spatial_merge_size) == (14, 2)
    assert image_processor.merge_size == 2
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 5_000_000
    processor_class = json.loads((tiny_model_dir / "processor_config.json").read_text())
    assert processor_class["processor_class"] == "Glm46VProcessor"


def test_chat_template_has_the_glm46v_prompt_format(tiny_model_dir):
    builder = PromptBuilder.from_pretrained(str(tiny_model_dir), local_files_only=True)
    image = ImagePart(ImageRef(sha256="x", width=28, height=28))
    user = Message(role="user", content=[image, TextPart("What is this?")])
    assert builder.render([user], thinking=True) == (
        "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
        "What is this?<|assistant|>\n"
    )
    assert builder.render([user], thinking=False).endswith("<|assistant|>\n<think></think>\n")
    history = [
        Message(role="system", content=[TextPart("Be brief.")]),
        Message(role="user", content=[TextPart("Hi")]),
        Message(role="assistant", content=[TextPart("Hello.")]),
        Message(role="user", content=[TextPart("Again")]),
    ]
    assert builder.render(history, thinking=True) == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello."
        "<|user|>\nAgain<|assistant|>\n"
    )


def test_image_expands_like_the_real_processor(tiny_model_dir):
    """672x672 -> 48x48 patches -> 576 image tokens (the figures of the real model)."""
    builder = PromptBuilder.from_pretrained(str(tiny_model_dir), local_files_only=True)
    ref = ImageRef(sha256="x", width=672, height=672)
    user = Message(role="user", content=[ImagePart(ref), TextPart("Describe.")])
    prompt = builder.build([user], {"x": image_bytes(672, 672)}, thinking=True)
    assert prompt.image_tokens == 576
    assert tuple(prompt.pixel_values.shape) == (2304, 1176)
    assert prompt.image_grid_thw.tolist() == [[1, 48, 48]]
    image_id = builder.image_token_id
    assert int((prompt.input_ids == image_id).sum()) == 576
    assert prompt.mm_token_type_ids.tolist() == (prompt.input_ids == image_id).int().tolist()


def _digest(path):
    return {
        name: hashlib.sha256((path / name).read_bytes()).hexdigest()
        for name in ("model.safetensors", "tokenizer.json", "config.json")
    }


def test_build_is_deterministic_for_a_seed(tmp_path):
    first = build_tiny_model(tmp_path / "a", seed=3, train_steps=3)
    second = build_tiny_model(tmp_path / "b", seed=3, train_steps=3)
    other = build_tiny_model(tmp_path / "c", seed=4, train_steps=3)
    assert _digest(first) == _digest(second)
    assert _digest(first)["model.safetensors"] != _digest(other)["model.safetensors"]


def test_management_command_writes_a_loadable_model(tmp_path):
    from django.core.management import call_command

    from inference.engine.runner import ModelRunner

    call_command("make_tiny_model", str(tmp_path / "m"), "--train-steps", "0")
    runner = ModelRunner.from_spec({"path": str(tmp_path / "m"), "device": "cpu"})
    assert runner.special.image_token_id == runner.tokenizer.convert_tokens_to_ids("<|image|>")
