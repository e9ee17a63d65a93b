"""The vision tower for serving: images of several requests packed, run a few layers a step.

``Glm4vVisionModel.forward`` runs the whole tower in one call: a large image (2016 px,
20,736 patches, ~90 TFLOP, attention being two thirds of it) then stalls every running
stream for the whole pass, and its patch embedding is a ``Conv3d`` and its attention a
Python loop of SDPA calls over per-image splits behind a ``.tolist()``.

``VisionPass`` computes the same arithmetic (``Glm4vVisionModel``, ``Glm4vVisionBlock``,
``Glm4vVisionAttention`` of transformers 5.24, step for step) for the images of one or more
requests packed into one sequence, and can stop between blocks: the engine runs as many
blocks per step as its prefill budget allows (``layer_cost``), so a large image is spread
over several steps while the decode batch keeps its pace, and small images of several
requests share each GEMM.

- patch embedding: the ``Conv3d`` has kernel = stride = the patch, so it is one GEMM over
  the flattened ``(C, T, P, P)`` patch with the kernel viewed as ``[hidden, C*T*P*P]``;
- each block: one QKV GEMM over all images, rotary in float32 (as the model), attention
  per image (``scaled_dot_product_attention``, the flash kernel on bf16; no padding, no
  cross-image mask, no fp32 scores in memory), the MLP's gate and up as one GEMM;
- the merge: the 2x2 ``Conv2d`` is one GEMM too, its kernel reordered to the patches'
  ``(kh, kw, C)`` layout, then the model's own merger.

The model's ``gate_proj``/``up_proj`` weights become views of the fused one (no added
memory); the model itself still works as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb_vision

from inference.engine.text_forward import fuse_linears, rms_norm

# Attention runs at a lower rate than the GEMMs; its FLOPs count this much more against a
# step's prefill budget (flash attention on Hopper reaches about half the dense GEMM rate).
ATTENTION_COST_FACTOR = 2.0


@dataclass(frozen=True)
class BlockWeights:
    norm1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj: torch.Tensor
    proj_bias: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]; gate_proj/up_proj are views of it
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class VisionWeights:
    """The vision tower's weights in serving layout (build once per model)."""

    def __init__(self, model: Any) -> None:
        visual = model.model.visual
        config = visual.config
        self.visual = visual
        self.eps = float(config.rms_norm_eps)
        self.heads = int(config.num_heads)
        self.hidden = int(config.hidden_size)
        self.head_dim = self.hidden // self.heads
        self.scaling = self.head_dim**-0.5
        self.merge = int(config.spatial_merge_size)
        self.out_hidden = int(config.out_hidden_size)
        proj = visual.patch_embed.proj
        self.patch_weight = proj.weight.detach().reshape(proj.out_channels, -1)
        self.patch_bias = proj.bias
        self.post_conv_norm = visual.post_conv_layernorm.weight
        self.post_norm = visual.post_layernorm.weight
        down = visual.downsample
        # [out, C, kh, kw] -> [out, kh*kw*C]: the row order of 2x2 blocks of patches.
        self.downsample_weight = (
            down.weight.detach().permute(0, 2, 3, 1).reshape(down.out_channels, -1).contiguous()
        )
        self.downsample_bias = down.bias
        self.blocks: list[BlockWeights] = []
        for block in visual.blocks:
            mlp = block.mlp
            gate_up, gate_up_bias = fuse_linears([mlp.gate_proj, mlp.up_proj])
            self.blocks.append(
                BlockWeights(
                    norm1=block.norm1.weight,
                    qkv=block.attn.qkv.weight,
                    qkv_bias=block.attn.qkv.bias,
                    proj=block.attn.proj.weight,
                    proj_bias=block.attn.proj.bias,
                    norm2=block.norm2.weight,
                    gate_up=gate_up,
                    gate_up_bias=gate_up_bias,
                    down=mlp.down_proj.weight,
                    down_bias=mlp.down_proj.bias,
                )
            )
        self.activation = visual.blocks[0].mlp.act_fn
        block0 = self.blocks[0]
        self._block_params = sum(
            t.numel() for t in (block0.qkv, block0.proj, block0.gate_up, block0.down)
        )

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def layer_cost(self, patches: Sequence[int]) -> float:
        """FLOPs of one block over images of ``patches`` patches each (attention weighted)."""
        linear = 2.0 * self._block_params * sum(patches)
        attention = 4.0 * self.hidden * sum(n * n for n in patches)
        return linear + ATTENTION_COST_FACTOR * attention

    def merge_cost(self, patches: Sequence[int]) -> float:
        """FLOPs of the final merge (downsample GEMM and merger MLP), roughly."""
        merged = sum(patches) // (self.merge * self.merge)
        return 2.0 * float(self.downsample_weight.numel() + 3 * self.out_hidden**2 * 4) * merged


class VisionPass:
    """One packed vision pass over ``pixels`` (``[patches, C*T*P*P]``, normalised, model
    dtype) of images ``grids`` (``[images, 3]`` t, h, w). ``run(blocks)`` advances it;
    ``finish()`` returns one ``[tokens_i, out_hidden]`` embedding per image.

    Not thread-safe; holds its activations between calls.
    """

    def __init__(self, weights: VisionWeights, pixels: torch.Tensor, grids: torch.Tensor) -> None:
        from transformers.vision_utils import get_vision_position_ids

        self.weights = weights
        visual = weights.visual
        device = pixels.device
        grids_cpu = grids.cpu()
        self.patches = [int(t * h * w) for t, h, w in grids_cpu.tolist()]
        self.done = 0  # blocks run
        with torch.inference_mode():
            x = F.linear(pixels, weights.patch_weight, weights.patch_bias)
            x = rms_norm(x, weights.post_conv_norm, weights.eps)
            # Positions on the host (the model builds them from .tolist() anyway).
            position_ids = get_vision_position_ids(grids_cpu, weights.merge).to(
                device, non_blocking=True
            )
            self.cos, self.sin = visual.rotary_pos_emb(x, position_ids)
            lengths = torch.tensor(self.patches, dtype=torch.long, device=device)
            self.x = visual.embeddings(
                x, lengths, grids.to(device), position_ids[:, 0], position_ids[:, 1]
            )

    @property
    def finished_blocks(self) -> bool:
        return self.done == self.weights.depth

    def next_block_cost(self) -> float:
        return self.weights.layer_cost(self.patches)

    @torch.inference_mode()
    def run(self, blocks: int) -> None:
        """Run the next ``blocks`` blocks (fewer if the tower ends first)."""
        weights = self.weights
        end = min(weights.depth, self.done + blocks)
        for block in weights.blocks[self.done : end]:
            self.x = self._block(self.x, block)
        self.done = end

    def _block(self, x: torch.Tensor, w: BlockWeights) -> torch.Tensor:
        weights = self.weights
        total = x.shape[0]
        qkv = F.linear(rms_norm(x, w.norm1, weights.eps), w.qkv, w.qkv_bias)
        query, key, value = qkv.view(total, 3, weights.heads, -1).unbind(1)
        query, key = apply_rotary_pos_emb_vision(query, key, self.cos, self.sin)
        out = torch.empty_like(query)
        start = 0
        for n in self.patches:
            end = start + n
            q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))
            attended = F.scaled_dot_product_attention(q, k, v, scale=weights.scaling)
            out[start:end] = attended[0].transpose(0, 1)
            start = end
        x = x + F.linear(out.reshape(total, -1), w.proj, w.proj_bias)
        gate, up = F.linear(rms_norm(x, w.norm2, weights.eps), w.gate_up, w.gate_up_bias).chunk(
            2, dim=-1
        )
        return x + F.linear(weights.activation(gate) * up, w.down, w.down_bias)

    @torch.inference_mode()
    def finish(self) -> list[torch.Tensor]:
        """The merged image embeddings, one per image (run every block first)."""
        if not self.finished_blocks:
            raise RuntimeError("finish() before every block ran")
        weights = self.weights
        x = rms_norm(self.x, weights.post_norm, weights.eps)
        merge = weights.merge
        x = F.linear(
            x.reshape(-1, merge * merge * weights.hidden),
            weights.downsample_weight,
            weights.downsample_bias,
        )
        merged = weights.visual.merger(x)
        sizes = [n // (merge * merge) for n in self.patches]
        # clone: a split is a view of the whole batch, which a cache entry would keep alive.
        return [part.clone() for part in torch.split(merged, sizes)]
