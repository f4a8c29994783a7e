"""Resize arithmetic against the reference table, RGB conversion, and the offline tokenizer's ids."""

import pytest
import torch
from PIL import Image

from bagel_core.config.image_args import resized_size
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.data.transforms import ImageTransform, to_rgb

VAE = (1024, 512, 16)
EDIT_VIT = (518, 224, 14)
VLM_VIT = (980, 378, 14)

# data-format.md 7.3: input -> (VAE, edit ViT, VLM ViT) output sizes.
TABLE = [
    ((1024, 1024), (1024, 1024), (518, 518), (980, 980)),
    ((980, 980), (976, 976), (518, 518), (980, 980)),
    ((1000, 1000), (992, 992), (518, 518), (980, 980)),
    ((1024, 768), (1024, 768), (518, 392), (980, 728)),
    ((1920, 1080), (1024, 576), (518, 294), (980, 546)),
    ((640, 480), (688, 512), (518, 392), (644, 476)),
    ((512, 512), (512, 512), (518, 518), (518, 518)),
    ((256, 256), (512, 512), (252, 252), (378, 378)),
    ((4000, 3000), (1024, 768), (518, 392), (980, 728)),
    ((2000, 500), (1024, 256), (518, 126), (980, 252)),
]


@pytest.mark.parametrize("size, vae, edit_vit, vlm_vit", TABLE)
def test_resize_matches_reference_table(size, vae, edit_vit, vlm_vit):
    assert resized_size(*size, *VAE) == vae
    assert resized_size(*size, *EDIT_VIT) == edit_vit
    assert resized_size(*size, *VLM_VIT, max_pixels=2_007_040) == vlm_vit


@pytest.mark.parametrize("images, side", [(1, 980), (2, 980), (4, 518), (8, 252)])
def test_multi_image_budget_quirk(images, side):
    assert resized_size(1000, 1000, *VLM_VIT, max_pixels=2_007_040, img_num=images) == (side, side)


def test_transform_output_range_and_shape():
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    pixels = ImageTransform(*VAE)(image)
    assert pixels.shape == (3, 512, 768) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]))


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_bundled_tokenizer_is_qwen25_with_bagel_ids():
    tokenizer, ids = load_tokenizer()
    assert len(tokenizer) == 151_665
    assert ids.as_dict() == {
        "bos_token_id": 151644,
        "eos_token_id": 151645,
        "start_of_image": 151652,
        "end_of_image": 151653,
    }
    # Qwen3-only added tokens are removed: literal "<think>" is ordinary BPE text as in Qwen2.5.
    assert len(tokenizer.encode("<think>")) > 1
    # No BOS/EOS added by plain encode (BAGEL wraps spans itself).
    assert tokenizer.encode("hello world") == [14990, 1879]
    assert tokenizer.decode(tokenizer.encode("Héllo 世界")) == "Héllo 世界"
