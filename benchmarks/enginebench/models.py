"""The runner a benchmark measures, and saving it as a checkpoint folder.

The full-size model is the real GLM-4.6V-Flash architecture (shared/notes/glm4v.md: 40 text
layers, hidden 4096, 32 heads over 2 KV heads, vision depth 24) with random weights, built
straight on the device in bf16: no checkpoint can be downloaded here. Its tokenizer and
image processor come from the tiny checkpoint, and every token id is read from those, as the
engine always does.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from inference.allocator import freeze_loaded_objects
from inference.engine.prompt import PromptBuilder
from inference.engine.runner import ModelRunner
from inference.tiny_model import build_tiny_model, tiny_config_dict

# The text and vision geometry of GLM-4.6V-Flash (shared/notes/glm4v.md).
FULL_TEXT = {
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [8, 12, 12],
    },
}
FULL_VISION = {
    "depth": 24,
    "hidden_size": 1536,
    "num_heads": 12,
    "intermediate_size": 13696,
    "out_hidden_size": 4096,
}
FULL_VOCAB = 151552


def build_tiny(directory: Path) -> Path:
    """The tiny checkpoint, untrained (a benchmark needs no sensible words), in ``directory``."""
    build_tiny_model(directory, seed=0, train_steps=0)
    return directory


def full_size_runner(
    tiny_dir: Path, device: torch.device, *, layers: int | None = None
) -> ModelRunner:
    """A randomly initialised GLM-4.6V-Flash-sized model (10B, bf16), built on ``device``.

    ``layers`` overrides the text depth (the CPU smoke test runs the code path on 1 layer).
    """
    from transformers import GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration

    prompts = PromptBuilder.from_pretrained(str(tiny_dir), local_files_only=True)
    cfg = tiny_config_dict(prompts.tokenizer, vocab_size=FULL_VOCAB)
    cfg["text_config"].update(FULL_TEXT)
    cfg["vision_config"].update(FULL_VISION)
    if layers is not None:
        cfg["text_config"]["num_hidden_layers"] = layers
        cfg["vision_config"]["depth"] = layers
    config = Glm4vConfig(**cfg)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Glm4vForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg["text_config"]["eos_token_id"],
        pad_token_id=cfg["text_config"]["pad_token_id"],
    )
    return ModelRunner(model.eval(), prompts, device=device)


def without_eos(runner: ModelRunner) -> ModelRunner:
    """Make every request run its full length: the engine sees no EOS ids."""
    runner.special = dataclasses.replace(runner.special, eos_ids=frozenset())
    return runner


def save_checkpoint(runner: ModelRunner, tiny_dir: Path, out_dir: Path) -> Path:
    """Write ``runner``'s model as a checkpoint folder loadable by ``ModelRunner.from_spec``:
    its weights and config, with the tokenizer and processor files of the tiny checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tiny_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, out_dir / path.name)
    # The engine's fused projections made some weights views of one tensor; the file gets
    # each as its own tensor, as in a real checkpoint (copied to the host one at a time).
    state = {name: t.detach().to("cpu", copy=True) for name, t in runner.model.state_dict().items()}
    runner.model.save_pretrained(out_dir, state_dict=state)
    return out_dir


def runner_from_args(args: Any, tiny_dir: Path) -> ModelRunner:
    """The runner the command line asks for: ``--full-size`` (random, on the GPU unless
    ``--device`` says otherwise), ``--model`` (a checkpoint folder), else the tiny model."""
    if args.full_size:
        device = torch.device("cuda" if args.device == "auto" else args.device)
        runner = full_size_runner(tiny_dir, device, layers=args.layers)
    else:
        path = args.model or str(tiny_dir)
        runner = ModelRunner.from_spec({"path": path, "dtype": args.dtype, "device": args.device})
    # As a worker does after its load (docs/benchmarks.md, "Garbage-collector pause"): no
    # full collection walks the model's objects between two timed steps.
    freeze_loaded_objects()
    return runner
