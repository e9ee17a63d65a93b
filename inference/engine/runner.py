"""Model runner: GLM-4.6V-family modelling code driven for continuous batching.

A prefill goes through the same steps as ``Glm4vModel.forward``, split so that the engine can
schedule them:

1. ``start_vision``: the vision tower (``vision_forward.VisionPass``), once per image, for
   every request admitted in one step together (one packed pass that the engine advances
   a few blocks per step), skipping images whose embedding is cached;
2. ``begin_prefill``: token embeddings with the image embeddings scattered over the image
   tokens, and the prompt's 3-D M-RoPE positions and decode offset (``rope_delta``);
3. ``prefill``: the text model over chunks ``start..end-1`` of several prompts at once
   (``text_forward.prefill_packed``), writing keys/values straight into each request's KV
   slot. One chunk for the whole prompt is an ordinary prefill; several chunks give the
   same result (up to float rounding) spread over engine steps.

Decode steps are run by ``decoder.BucketedDecoder`` (fixed shapes, CUDA graphs). The
model's own forward is used only by ``model.generate`` (references and baselines).
All special-token ids come from the checkpoint (config, generation config, tokenizer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.engine.image_cache import ImageEmbeddingCache
from inference.engine.kv_cache import SlotKVCache
from inference.engine.prompt import PreparedPrompt, ProcessedImage, PromptBuilder
from inference.engine.text_forward import (
    PackedChunk,
    TextWeights,
    make_decode_layer,
    make_prefill_parts,
    prefill_packed,
)
from inference.engine.vision_forward import VisionPass, VisionWeights
from inference.protocol import Message

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPES["float64"] = torch.float64


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

    embeds: torch.Tensor  # [L, hidden] input embeddings, images scattered in
    positions: torch.Tensor  # [3, L] M-RoPE positions
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
        # Serving layouts of the weights (fused projections; the model's own parameters
        # become views of them, so ``model.generate`` keeps working on the same memory).
        self.text_weights = TextWeights(model)
        self.vision_weights = VisionWeights(model)
        self._decode_layers: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}
        self._prefill_parts = make_prefill_parts(self.text_weights)
        self.prefill_compiled = False
        self.prefill_compile_error: str | None = None

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
        torch.nn.Module.to(model, device).eval()
        prompts = PromptBuilder.from_pretrained(spec.path, local_files_only=local)
        return cls(model, prompts, device=device)

    def decode_layer(
        self, attention: str, *, compiled: bool, mode: str | None = None, backend: str = "inductor"
    ) -> Callable[..., torch.Tensor]:
        """The decode layer function (``text_forward.make_decode_layer``), compiled or not,
        one per setting for the runner's lifetime: engines built on the same runner (the
        benchmarks build several) share its compiled code instead of tracing it again."""
        key = (attention, compiled, mode, backend)
        layer = self._decode_layers.get(key)
        if layer is None:
            layer = make_decode_layer(self.text_weights, attention)
            if compiled:
                layer = torch.compile(layer, mode=mode, backend=backend, fullgraph=True)
            self._decode_layers[key] = layer
        return layer

    def compile_prefill(self, *, mode: str | None = None, backend: str = "inductor") -> None:
        """Run the prefill's layer halves compiled from now on (dynamic in the token count;
        compiled at the next prefill, e.g. the engine's warm-up). Idempotent."""
        if not self.prefill_compiled:
            pre, post = make_prefill_parts(self.text_weights)
            options: dict[str, Any] = {"mode": mode, "backend": backend, "fullgraph": True}
            self._prefill_parts = (torch.compile(pre, **options), torch.compile(post, **options))
            self.prefill_compiled = True

    def _prefill_failed_to_compile(self, exc: Exception) -> None:
        logger.exception("compiling the prefill failed; it stays eager")
        self.prefill_compile_error = f"{type(exc).__name__}: {exc}"
        self._prefill_parts = make_prefill_parts(self.text_weights)
        self.prefill_compiled = False

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return str(self.device)

    def memory_bytes(self, cache: SlotKVCache | None = None) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        params = sum(int(p.nbytes) for p in self.model.parameters())
        return params + (cache.nbytes if cache is not None else 0)

    def free_memory_bytes(self) -> int | None:
        """Free accelerator memory now, or None on CPU (sized from the config there)."""
        if self.device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

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
    def start_vision(
        self, prompts: Sequence[PreparedPrompt], cache: ImageEmbeddingCache | None
    ) -> VisionJob:
        """The vision work of ``prompts``: images in ``cache`` are looked up now, the others
        (each distinct image once, however many prompts hold it) go into one packed
        ``VisionPass`` that the caller advances (``VisionJob.run``) until ``done``."""
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
        vision = None
        if todo:
            with torch.inference_mode():
                # uint8 pixels go to the device; resize, patchify and normalise happen there.
                pixels = torch.cat(
                    [i.model_pixels(device=self.device, dtype=self.dtype) for i in todo.values()]
                )
                grids = torch.stack([image.grid_thw for image in todo.values()])
            vision = VisionPass(self.vision_weights, pixels, grids)
        return VisionJob(list(prompts), vision, list(todo), found, cached_keys, cache)

    def encode_images(
        self, prompts: Sequence[PreparedPrompt], cache: ImageEmbeddingCache | None
    ) -> list[EncodedImages]:
        """Image embeddings of every prompt, in one call (``start_vision`` run to the end)."""
        job = self.start_vision(prompts, cache)
        job.run(job.blocks_left)
        return job.results()

    @torch.inference_mode()
    def begin_prefill(self, prompt: PreparedPrompt, images: EncodedImages) -> PrefillJob:
        """Input embeddings and M-RoPE positions of ``prompt`` (as ``Glm4vModel.forward``)."""
        ids = prompt.input_ids.to(self.device, non_blocking=True)
        embeds = self.model.model.get_input_embeddings()(ids)
        if images.embeddings:
            image_embeds = torch.cat(images.embeddings).to(embeds.dtype)
            if prompt.image_tokens != image_embeds.shape[0]:
                raise ValueError("image tokens and image embeddings do not match")
            mask = (ids == self.special.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, image_embeds)
        positions, rope_delta = self._prompt_positions(prompt)
        return PrefillJob(
            embeds[0],
            positions.to(self.device, non_blocking=True),
            rope_delta,
            prompt.input_ids[0].tolist(),
        )

    def _prompt_positions(self, prompt: PreparedPrompt) -> tuple[torch.Tensor, int]:
        """3-D M-RoPE positions ``[3, L]`` of the prompt and its decode offset (0 without
        images), computed on the host from the prompt's CPU tensors (the model's
        ``get_rope_index`` walks the tokens in Python: on device tensors each step would
        synchronise).

        Computed here rather than left to the model, whose ``rope_deltas`` attribute is state
        shared by every request (a text-only prefill would otherwise see a stale value).
        """
        ids = prompt.input_ids
        if prompt.image_grid_thw is not None:
            positions, deltas = self.model.model.get_rope_index(
                ids,
                mm_token_type_ids=prompt.mm_token_type_ids,
                image_grid_thw=prompt.image_grid_thw,
                attention_mask=torch.ones_like(ids),
            )
            return positions[:, 0], int(deltas.reshape(-1)[0])
        positions = torch.arange(ids.shape[1]).view(1, -1).expand(3, -1)
        return positions, 0

    def prefill(
        self, cache: SlotKVCache, chunks: Sequence[tuple[PrefillJob, int, int]]
    ) -> list[torch.Tensor | None]:
        """One packed forward over ``chunks`` ``(job, slot, end)``: positions
        ``job.done..end-1`` of each job go into its slot and ``job.done`` becomes ``end``.

        Returns, per chunk, the next-token logits ``[vocab]`` (float32) when ``end``
        completes the prompt, else None. Each job at most once per call.
        """
        if len({id(job) for job, _, _ in chunks}) != len(chunks):
            raise ValueError("a prompt appears twice in one packed prefill")
        packed = []
        for job, slot, end in chunks:
            if not job.done < end <= min(job.length, cache.max_len):
                raise ValueError(f"chunk {job.done}..{end} outside prompt of {job.length}")
            packed.append(PackedChunk(slot=slot, start=job.done, end=end))
        embeds = torch.cat([job.embeds[job.done : end] for job, _, end in chunks])
        positions = torch.cat([job.positions[:, job.done : end] for job, _, end in chunks], dim=1)
        completes = [end == job.length for job, _, end in chunks]
        last_rows, offset = [], 0
        for chunk, complete in zip(packed, completes, strict=True):
            offset += chunk.length
            if complete:
                last_rows.append(offset - 1)

        def run() -> torch.Tensor:
            return prefill_packed(
                self.text_weights,
                cache.keys,
                cache.values,
                embeds,
                positions,
                packed,
                last_rows=last_rows,
                parts=self._prefill_parts,
                dynamic=self.prefill_compiled,
            )

        if not self.prefill_compiled:
            logits = run()
        else:
            try:
                logits = run()
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a compiler problem, not the request's: go on eager
                self._prefill_failed_to_compile(exc)
                logits = run()
        for job, _, end in chunks:
            job.done = end
        out: list[torch.Tensor | None] = []
        row = 0
        for complete in completes:
            if complete:
                out.append(logits[row].float())
                row += 1
            else:
                out.append(None)
        return out

    def prefill_chunk(
        self, cache: SlotKVCache, job: PrefillJob, slot: int, end: int
    ) -> torch.Tensor | None:
        """``prefill`` of one chunk: positions ``job.done..end-1`` into ``slot``."""
        return self.prefill(cache, [(job, slot, end)])[0]


@dataclass
class VisionJob:
    """The images of some prompts on their way to embeddings (``ModelRunner.start_vision``).

    ``run(blocks)`` advances the packed pass; once ``done``, ``results()`` gives each
    prompt's ``EncodedImages`` and puts the new embeddings into the cache.
    """

    prompts: list[PreparedPrompt]
    vision: VisionPass | None
    keys: list[str]  # images of the pass, in pass order
    found: dict[str, torch.Tensor]
    cached_keys: set[str]
    cache: ImageEmbeddingCache | None

    @property
    def done(self) -> bool:
        return self.vision is None or self.vision.finished_blocks

    @property
    def blocks_left(self) -> int:
        return 0 if self.vision is None else self.vision.weights.depth - self.vision.done

    def block_cost(self) -> float:
        """FLOPs of the next block (0 when done)."""
        if self.vision is None or self.vision.finished_blocks:  # self.done, narrowing vision
            return 0.0
        return self.vision.next_block_cost()

    def run(self, blocks: int) -> None:
        if self.vision is not None and blocks > 0:
            self.vision.run(blocks)

    def results(self) -> list[EncodedImages]:
        if not self.done:
            raise RuntimeError("results() before the vision pass finished")
        if self.vision is not None:
            for key, embedding in zip(self.keys, self.vision.finish(), strict=True):
                self.found[key] = embedding
                if self.cache is not None:
                    self.cache.put(key, embedding)
            self.vision = None
        out = []
        seen: set[str] = set(self.cached_keys)
        for prompt in self.prompts:
            encoded = EncodedImages([self.found[image.key] for image in prompt.images])
            for image in prompt.images:
                if image.key in seen:
                    encoded.cached_tokens += image.tokens
                seen.add(image.key)
            out.append(encoded)
        return out
