"""Model runner: GLM-4.6V-family modelling code driven for continuous batching.

- ``prefill`` runs one request alone (vision encoder + prompt, a ``DynamicCache``, exactly the
  code path ``model.generate`` takes for its first step) and returns its logits, keys/values
  and rope delta; the engine copies the keys/values into the request's slot.
- ``decode`` runs one token for every running request in a single forward of the text model:
  the slot cache writes each row at its own position, a boolean ``[batch, 1, 1, kv_len]`` mask
  lets each row see only its own cached length, and M-RoPE positions are
  ``cached_len + rope_delta`` on all three axes.

All special-token ids come from the checkpoint (config, generation config, tokenizer).

GPU fast-path extension points (not implemented here; this runs eagerly on CPU and GPU):
``decode`` already takes fixed-capacity inputs (a slot cache and ``kv_len`` rounded up to a
bucket); a CUDA-graph path would keep per-batch-bucket static buffers for ids, positions,
mask and slot index, copy into them and replay.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.engine.kv_cache import SlotKVCache
from inference.engine.prompt import PreparedPrompt, PromptBuilder
from inference.protocol import Message

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPES["float64"] = torch.float64
# kv_len of a decode step is rounded up to this, so attention shapes repeat across steps.
KV_LEN_BUCKET = 64
# Attention implementations that take the per-row 4D mask decode builds.
_MASKED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class ModelSpec:
    """What to load: ``{"path": ..., "dtype": "auto"|"bfloat16"|..., "device": "auto"|...}``."""

    path: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: CUDA when present, else CPU
    attn_implementation: str = "sdpa"  # or "eager"

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> ModelSpec:
        return cls(
            path=str(spec["path"]),
            dtype=str(spec.get("dtype", "auto")),
            device=str(spec.get("device", "auto")),
            attn_implementation=str(spec.get("attn_implementation", "sdpa")),
        )

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device)
        if self.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif self.dtype in _DTYPES:
            dtype = _DTYPES[self.dtype]
        else:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {sorted(_DTYPES)} or auto")
        return device, dtype


@dataclass(frozen=True)
class SpecialTokens:
    """Ids read from the checkpoint; never hard-coded (they differ between GLM checkpoints)."""

    eos_ids: frozenset[int]
    image_token_id: int
    think_start_id: int | None
    think_end_id: int | None

    @classmethod
    def read(cls, model: Any, tokenizer: Any) -> SpecialTokens:
        eos: set[int] = set()
        sources = (
            getattr(model, "generation_config", None),
            model.config,
            model.config.get_text_config(),
        )
        for source in sources:
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                eos.add(value)
            elif value:
                eos.update(int(v) for v in value)
        if not eos and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        return cls(
            eos_ids=frozenset(eos),
            image_token_id=int(model.config.image_token_id),
            think_start_id=_token_id(tokenizer, "<think>"),
            think_end_id=_token_id(tokenizer, "</think>"),
        )


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if the vocabulary has it as one token, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # [vocab] float32, next-token logits after the prompt
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [1, kv_heads, L, head_dim]
    rope_delta: int  # decode position of token t is t + rope_delta (all three M-RoPE axes)


class ModelRunner:
    """Owns the model, its prompt builder and its special tokens. Not thread-safe."""

    def __init__(self, model: Any, prompts: PromptBuilder, *, device: torch.device) -> None:
        self.model = model
        self.prompts = prompts
        self.tokenizer = prompts.tokenizer
        self.device = device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.special = SpecialTokens.read(model, self.tokenizer)
        text = model.config.get_text_config()
        self.num_layers = int(text.num_hidden_layers)
        self.kv_heads = int(text.num_key_value_heads)
        self.head_dim = int(
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        )
        self.vocab_size = int(text.vocab_size)
        attention = text._attn_implementation
        if attention not in _MASKED_ATTENTION:
            # Decode hands the text model a ready 4D mask; flash-attention paths take none.
            raise ValueError(f"attention {attention!r} unsupported; use one of {_MASKED_ATTENTION}")
        self._bool_mask = attention != "eager"  # eager adds the mask to the scores

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | ModelSpec) -> ModelRunner:
        from transformers import Glm4vForConditionalGeneration

        if not isinstance(spec, ModelSpec):
            spec = ModelSpec.from_mapping(spec)
        device, dtype = spec.resolve()
        local = Path(spec.path).is_dir()
        model = Glm4vForConditionalGeneration.from_pretrained(
            spec.path,
            dtype=dtype,
            local_files_only=local,
            attn_implementation=spec.attn_implementation,
        )
        model.to(device).eval()
        prompts = PromptBuilder.from_pretrained(spec.path, local_files_only=local)
        return cls(model, prompts, device=device)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return str(self.device)

    def memory_bytes(self, cache: SlotKVCache | None = None) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        params = sum(p.nbytes for p in self.model.parameters())
        return params + (cache.nbytes if cache is not None else 0)

    def prepare(
        self, messages: Sequence[Message], images: Mapping[str, bytes], *, thinking: bool
    ) -> PreparedPrompt:
        """Inputs for one request (CPU work: template, image decode/resize). Raises PromptError."""
        return self.prompts.build(messages, images, thinking=thinking)

    def allocate_cache(self, *, num_slots: int, max_len: int) -> SlotKVCache:
        return SlotKVCache(
            num_layers=self.num_layers,
            num_slots=num_slots,
            kv_heads=self.kv_heads,
            max_len=max_len,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def prefill(self, prompt: PreparedPrompt) -> PrefillOutput:
        """Encode images + prompt alone: next-token logits, the prompt's KV, its rope delta.

        The caller copies ``kv`` into a slot (``SlotKVCache.write_prompt``) and drops it.
        """
        inputs = {k: v.to(self.device) for k, v in prompt.model_inputs().items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        position_ids, rope_delta = self._prompt_positions(inputs)
        out = self.model(
            **inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1, return_dict=True
        )
        return PrefillOutput(
            logits=out.logits[0, -1].float(),
            kv=[(layer.keys, layer.values) for layer in out.cache.layers],
            rope_delta=rope_delta,
        )

    def _prompt_positions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """3-D M-RoPE positions of the prompt and its decode offset (0 without images).

        Computed here rather than left to the model, whose ``rope_deltas`` attribute is state
        shared by every request (a text-only prefill would otherwise see a stale value).
        """
        ids = inputs["input_ids"]
        if "image_grid_thw" in inputs:
            positions, deltas = self.model.model.get_rope_index(
                ids,
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"],
            )
            return positions, int(deltas.reshape(-1)[0])
        positions = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
        return positions, 0

    @torch.inference_mode()
    def decode(
        self,
        cache: SlotKVCache,
        *,
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
        rope_deltas: Sequence[int],
    ) -> torch.Tensor:
        """One token for each row: row ``i`` feeds ``token_ids[i]`` at ``positions[i]`` (its
        cached length) in ``slots[i]``. Returns next-token logits ``[batch, vocab]`` float32.
        """
        batch = len(slots)
        device = self.device
        pos = torch.tensor(list(positions), dtype=torch.long, device=device)
        delta = torch.tensor(list(rope_deltas), dtype=torch.long, device=device)
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=device).view(batch, 1)
        kv_len = min(cache.max_len, _round_up(int(pos.max()) + 1, KV_LEN_BUCKET))
        position_ids = (pos + delta).view(1, batch, 1).expand(3, batch, 1)
        visible = torch.arange(kv_len, device=device).view(1, kv_len) <= pos.view(batch, 1)
        mask = visible.view(batch, 1, 1, kv_len)
        if not self._bool_mask:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        view = cache.decode_view(slots, pos, kv_len)
        out = self.model.model.language_model(
            input_ids=ids,
            position_ids=position_ids,
            attention_mask=mask,
            cache=view,
            use_cache=True,
        )
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
