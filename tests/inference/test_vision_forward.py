"""vision_forward: the packed, resumable vision pass computes the model's image features.

Float64 random wide-init model: a patch attending to another image's patches, a wrong
rotary position or a block run twice would change the embeddings well beyond rounding.
"""

from __future__ import annotations

import pytest
import torch

from inference.engine.vision_forward import VisionPass, VisionWeights
from tests.inference.conftest import chat_request, image_bytes, parameter_storage_bytes

# Different sizes, so different patch counts per image (12, 9 and 8 merged tokens).
SIZES = ((56, 84), (28, 28), (112, 56))


def _pixels(runner, sizes):
    """The vision input of images of ``sizes`` as the runner feeds it: normalised patches
    ``[patches, C*T*P*P]`` and grids ``[images, 3]``."""
    shas = {f"i{n}": size for n, size in enumerate(sizes)}
    images = {sha: image_bytes(w, h, seed=n) for n, (sha, (w, h)) in enumerate(shas.items())}
    request = chat_request("r", "What is in the image?", images=shas)
    processed = runner.process_images(request.messages, images, scope="tests")
    pixels = torch.cat([image.model_pixels(dtype=runner.dtype) for image in processed])
    return pixels, torch.stack([image.grid_thw for image in processed])


def _model_features(model, pixels, grids):
    with torch.inference_mode():
        return model.model.get_image_features(pixels, grids, return_dict=True).pooler_output


@pytest.mark.parametrize("sizes", [SIZES[:1], SIZES], ids=["one-image", "three-sizes"])
def test_packed_pass_equals_the_models_image_features(tiny_random_runner, sizes):
    runner = tiny_random_runner
    pixels, grids = _pixels(runner, sizes)
    vision = VisionPass(runner.vision_weights, pixels, grids)
    vision.run(runner.vision_weights.depth)
    ours = vision.finish()
    expected = _model_features(runner.model, pixels, grids)
    assert len(ours) == len(expected) == len(sizes)
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


def test_a_pass_run_in_pieces_equals_one_run(tiny_random_runner):
    runner = tiny_random_runner
    pixels, grids = _pixels(runner, SIZES)
    depth = runner.vision_weights.depth
    whole = VisionPass(runner.vision_weights, pixels, grids)
    whole.run(depth)
    expected = whole.finish()

    pieces = VisionPass(runner.vision_weights, pixels, grids)
    pieces.run(0)
    for done in range(depth):
        assert pieces.done == done and not pieces.finished_blocks
        with pytest.raises(RuntimeError):
            pieces.finish()  # not every block ran yet
        pieces.run(1)
    pieces.run(3)  # past the last block: nothing more runs
    assert pieces.done == depth and pieces.finished_blocks
    for mine, theirs in zip(pieces.finish(), expected, strict=True):
        assert torch.equal(mine, theirs)


def test_layer_cost_grows_with_patches_and_quadratically_with_an_images_size(tiny_runner):
    cost = tiny_runner.vision_weights.layer_cost
    n = 64
    assert 0 < cost([n]) < cost([n, 16]) < cost([n, n])
    # Attention is per image: one image of 2n patches costs more than two of n.
    assert cost([2 * n]) > cost([n, n])

    def attention(m):  # what doubling one image adds beyond twice the linear work
        return cost([2 * m]) - 2 * cost([m])

    assert attention(2 * n) == pytest.approx(4 * attention(n))
    pixels, grids = _pixels(tiny_runner, SIZES)
    vision = VisionPass(tiny_runner.vision_weights, pixels, grids)
    assert vision.next_block_cost() == cost([int(g.prod()) for g in grids])


def test_fusing_the_mlp_keeps_the_towers_output_and_adds_no_memory(tiny_model_dir, tiny_runner):
    from transformers import Glm4vForConditionalGeneration

    model = Glm4vForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float64, local_files_only=True
    ).eval()
    pixels, grids = _pixels(tiny_runner, SIZES[:2])  # same checkpoint: its preprocessing
    before = _model_features(model, pixels, grids)
    memory = parameter_storage_bytes(model)

    weights = VisionWeights(model)

    after = _model_features(model, pixels, grids)
    for mine, theirs in zip(after, before, strict=True):
        assert torch.equal(mine, theirs)
    assert parameter_storage_bytes(model) == memory
    for block, fused in zip(model.model.visual.blocks, weights.blocks, strict=True):
        mlp = block.mlp
        assert torch.equal(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), fused.gate_up)
        for linear in (mlp.gate_proj, mlp.up_proj):  # views of the fused weight, not copies
            assert linear.weight.untyped_storage().data_ptr() == fused.gate_up.data_ptr()
