"""Model runner: GLM-4.6V-family modelling code driven for continuous batching.

A prefill goes through the same steps as ``Glm4vModel.forward``, split so that the engine can
schedule them:

1. ``encode_images``: the vision tower, once per image, for every request admitted in one
   step together (one batched pass), skipping images whose embedding is cached;
2. ``begin_prefill``: token embeddings with the image embeddings scattered over the image
   tokens, and the prompt's 3-D M-RoPE positions and decode offset (``rope_delta``);
3. ``prefill_chunk``: the text model over positions ``start..end-1`` of those embeddings,
   writing keys/values straight into the request's KV slot and attending over
   ``0..end-1`` with a causal mask. One chunk for the whole prompt is an ordinary prefill;
   several chunks give the same result (up to float rounding) spread over engine steps.

Decode steps are run by ``decoder.BucketedDecoder`` (fixed shapes, CUDA graphs).
All special-token ids come from the checkpoint (config, generation config, tokenizer).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.engine.attention import register_grouped_attention
from inference.engine.image_cache import ImageEmbeddingCache
from inference.engine.kv_cache import SlotKVCache
from inference.engine.prompt import PreparedPrompt, ProcessedImage, PromptBuilder
from inference.protocol import Message

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPES["float64"] = torch.float64
# Attention implementations that take the 4D masks the engine builds.
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
class EncodedImages:
    """One request's image embeddings, in prompt order, and how many tokens were cached."""

    embeddings: list[torch.Tensor]  # [tokens_i, hidden] each, on the model's device
    cached_tokens: int = 0


@dataclass
class PrefillJob:
    """A prompt on its way into a KV slot. ``done`` positions are written; ``0 <= done <= length``."""

    embeds: torch.Tensor  # [1, L, hidden] input embeddings, images scattered in
    positions: torch.Tensor  # [3, 1, L] M-RoPE positions
    rope_delta: int  # decode position of token t is t + rope_delta (all three axes)
    token_ids: list[int]  # the prompt's ids (the output stream looks for think tags)
    done: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def remaining(self) -> int:
        return self.length - self.done


class ModelRunner:
    """Owns the model, its prompt builder and its special tokens. Not thread-safe, except
    ``process_images`` (CPU preprocessing, no model)."""

    def __init__(self, model: Any, prompts: PromptBuilder, *, device: torch.device) -> None:
        self.model = model
        self.prompts = prompts
        self.tokenizer = prompts.tokenizer
        self.device = device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.special = SpecialTokens.read(model, self.tokenizer)
        text = model.config.get_text_config()
        self.text_config = text
        self.num_layers = int(text.num_hidden_layers)
        self.kv_heads = int(text.num_key_value_heads)
        self.head_dim = int(
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        )
        self.vocab_size = int(text.vocab_size)
        attention = text._attn_implementation
        if attention not in _MASKED_ATTENTION:
            # The engine hands the text model ready 4D masks; flash-attention paths take none.
            raise ValueError(f"attention {attention!r} unsupported; use one of {_MASKED_ATTENTION}")
        self.attention: str = attention
        register_grouped_attention()

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

    def free_memory_bytes(self) -> int | None:
        """Free accelerator memory now, or None on CPU (sized from the config there)."""
        if self.device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

    def additive_mask(self, attention: str | None) -> bool:
        """Whether ``attention`` (None: the model's own) wants an additive float mask."""
        return (attention or self.attention) == "eager"

    # ------------------------------------------------------------------ prompts (CPU)
    def prepare(
        self, messages: Sequence[Message], images: Mapping[str, bytes], *, thinking: bool
    ) -> PreparedPrompt:
        """The whole prompt in one call, as ``model.generate`` takes it (tests, benchmarks)."""
        return self.prompts.build(messages, images, thinking=thinking)

    def process_images(
        self, messages: Sequence[Message], images: Mapping[str, bytes], *, scope: str
    ) -> list[ProcessedImage]:
        """Decode + preprocess the images (thread-safe, no model). Raises PromptError."""
        return self.prompts.process_images(messages, images, scope=scope)

    def build_prompt(
        self, messages: Sequence[Message], images: Sequence[ProcessedImage], *, thinking: bool
    ) -> PreparedPrompt:
        """Template and tokens around processed images (engine thread). Raises PromptError."""
        return self.prompts.build_from_processed(messages, images, thinking=thinking)

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

    def bytes_per_slot(self, max_len: int) -> int:
        return SlotKVCache.bytes_per_slot(
            num_layers=self.num_layers,
            kv_heads=self.kv_heads,
            max_len=max_len,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def encode_images(
        self, prompts: Sequence[PreparedPrompt], cache: ImageEmbeddingCache | None
    ) -> list[EncodedImages]:
        """Image embeddings of every prompt: one vision pass over all images not in ``cache``
        (each distinct image once, however many prompts hold it); new ones are cached."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, ProcessedImage] = {}
        cached_keys: set[str] = set()
        for image in (image for prompt in prompts for image in prompt.images):
            if image.key in found or image.key in todo:
                if cache is not None:
                    cache.count_hit()
                continue
            hit = cache.get(image.key) if cache is not None else None
            if hit is not None:
                found[image.key] = hit
                cached_keys.add(image.key)
            else:
                todo[image.key] = image
        if todo:
            for key, embedding in zip(todo, self._vision(list(todo.values())), strict=True):
                found[key] = embedding
                if cache is not None:
                    cache.put(key, embedding)
        out = []
        seen: set[str] = set(cached_keys)
        for prompt in prompts:
            encoded = EncodedImages([found[image.key] for image in prompt.images])
            for image in prompt.images:
                if image.key in seen:
                    encoded.cached_tokens += image.tokens
                seen.add(image.key)
            out.append(encoded)
        return out

    def _vision(self, images: Sequence[ProcessedImage]) -> list[torch.Tensor]:
        # uint8 patches are normalised on the device (one gather there, not float passes in
        # the preprocessing threads); pixel values identical to the processor's.
        pixels = torch.cat(
            [image.model_pixels(device=self.device, dtype=self.dtype) for image in images]
        )
        grid = torch.stack([image.grid_thw for image in images]).to(self.device)
        out = self.model.model.get_image_features(pixels, grid, return_dict=True)
        # clone: a split is a view of the whole batch, which a cache entry would keep alive.
        return [embedding.clone() for embedding in out.pooler_output]

    @torch.inference_mode()
    def begin_prefill(self, prompt: PreparedPrompt, images: EncodedImages) -> PrefillJob:
        """Input embeddings and M-RoPE positions of ``prompt`` (as ``Glm4vModel.forward``)."""
        ids = prompt.input_ids.to(self.device)
        embeds = self.model.model.get_input_embeddings()(ids)
        if images.embeddings:
            image_embeds = torch.cat(images.embeddings).to(embeds.dtype)
            mask = (ids == self.special.image_token_id).unsqueeze(-1)
            if int(mask.sum()) != image_embeds.shape[0]:
                raise ValueError("image tokens and image embeddings do not match")
            embeds = embeds.masked_scatter(mask, image_embeds)
        positions, rope_delta = self._prompt_positions(prompt, ids)
        return PrefillJob(embeds, positions, rope_delta, prompt.input_ids[0].tolist())

    def _prompt_positions(
        self, prompt: PreparedPrompt, ids: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """3-D M-RoPE positions of the prompt and its decode offset (0 without images).

        Computed here rather than left to the model, whose ``rope_deltas`` attribute is state
        shared by every request (a text-only prefill would otherwise see a stale value).
        """
        if prompt.image_grid_thw is not None:
            positions, deltas = self.model.model.get_rope_index(
                ids,
                mm_token_type_ids=prompt.mm_token_type_ids.to(self.device),
                image_grid_thw=prompt.image_grid_thw.to(self.device),
                attention_mask=torch.ones_like(ids),
            )
            return positions, int(deltas.reshape(-1)[0])
        positions = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
        return positions, 0

    @torch.inference_mode()
    def prefill_chunk(
        self, cache: SlotKVCache, job: PrefillJob, slot: int, end: int
    ) -> torch.Tensor | None:
        """Run positions ``job.done..end-1`` into ``slot``; advance ``job.done`` to ``end``.

        Returns the next-token logits ``[vocab]`` (float32) when ``end`` completes the prompt,
        else None. Uses the model's own attention (SDPA): prefill is compute-bound.
        """
        start = job.done
        queries = end - start
        causal = torch.arange(end, device=self.device).view(1, end) <= torch.arange(
            start, end, device=self.device
        ).view(queries, 1)
        mask = causal.view(1, 1, queries, end)
        if self.additive_mask(None):
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        out = self.model.model.language_model(
            inputs_embeds=job.embeds[:, start:end],
            position_ids=job.positions[:, :, start:end],
            attention_mask=mask,
            cache=cache.chunk_view(slot, start, end),
            use_cache=True,
        )
        job.done = end
        if end < job.length:
            return None
        return self.model.lm_head(out.last_hidden_state[0, -1]).float()
