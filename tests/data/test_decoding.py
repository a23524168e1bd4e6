"""Tests of dino_hf.data.decoding, the one image decoder: stored entries -> (3, H, W) uint8 RGB tensors,
bad entries refused, and every input type and mode the augmentation accepts through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_datasets import CORRUPT_KINDS, corrupt_entry_bytes, encode_png, make_image
from PIL import Image
from tiny_models import SMALL_MULTI_CROP as SMALL
from tiny_models import seeded_generator as _generator

from dino_hf.data.augmentation import MultiCropAugmentation
from dino_hf.data.decoding import BadImageError, decode_image, to_rgb_uint8


# ---------------------------------------------------------------------------------------------
# Stored entries
# ---------------------------------------------------------------------------------------------
def test_decode_image_rejects_bad_entries():
    assert decode_image({"bytes": encode_png(make_image(1, 9)), "path": None}).shape == (3, 9, 9)
    assert decode_image(encode_png(make_image(1, 9).convert("L"))).shape == (3, 9, 9)
    for kind in CORRUPT_KINDS:
        with pytest.raises(BadImageError):
            data = corrupt_entry_bytes(kind)
            decode_image(None if data is None else {"bytes": data, "path": None})


# ---------------------------------------------------------------------------------------------
# Input conversion
# ---------------------------------------------------------------------------------------------
def _sixteen_bit_png(gray: Image.Image) -> Image.Image:
    """A 16-bit grayscale PNG, decoded as PIL opens it (mode ``I;16`` or ``I``)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def _pil_modes():
    rgb = make_image(2, 20)
    gray = rgb.convert("L")
    sixteen = _sixteen_bit_png(gray)
    return {
        "RGB": rgb,
        "L": gray,
        "LA": rgb.convert("LA"),
        "P": rgb.convert("P"),
        "PA": rgb.convert("RGBA").convert("PA"),
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "1": rgb.convert("1"),
        "I;16": sixteen,
        "I": Image.fromarray(np.asarray(gray).astype(np.int32) * 257),
        "F": Image.fromarray(np.asarray(gray).astype(np.float32) / 255.0),
    }


@pytest.mark.parametrize("mode", list(_pil_modes()))
def test_pil_modes_become_rgb(mode):
    image = _pil_modes()[mode]
    pixels = to_rgb_uint8(image)
    assert pixels.shape == (3, 20, 20) and pixels.dtype == torch.uint8
    views = MultiCropAugmentation(**SMALL)(image, generator=_generator(0))
    assert len(views) == 5 and all(v.dtype == torch.float32 for v in views)


def test_grayscale_and_16_bit_keep_their_levels():
    gray = make_image(2, 20).convert("L")
    expected = torch.from_numpy(np.array(gray)).expand(3, -1, -1)
    assert torch.equal(to_rgb_uint8(gray), expected)
    sixteen = _sixteen_bit_png(gray)
    assert sixteen.mode.startswith("I")
    assert torch.equal(to_rgb_uint8(sixteen), expected)  # 16-bit scaled to 8 bits, not clipped
    rgba = make_image(2, 20).convert("RGBA")
    assert torch.equal(to_rgb_uint8(rgba), to_rgb_uint8(make_image(2, 20)))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8),
        torch.randint(0, 256, (1, 20, 24), dtype=torch.uint8),
        torch.randint(0, 256, (4, 20, 24), dtype=torch.uint8),
        torch.randint(0, 256, (20, 24), dtype=torch.uint8),
        torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8),
        torch.rand(3, 20, 24),
        torch.randint(0, 65536, (3, 20, 24), dtype=torch.int32).to(torch.uint16),
    ],
)
def test_tensor_inputs(tensor):
    pixels = to_rgb_uint8(tensor)
    assert pixels.shape == (3, 20, 24) and pixels.dtype == torch.uint8
    assert len(MultiCropAugmentation(**SMALL)(tensor, generator=_generator(0))) == 5


def test_numpy_input_matches_pil_input():
    image = make_image(4, 30)
    assert torch.equal(to_rgb_uint8(np.asarray(image)), to_rgb_uint8(image))
    augmentation = MultiCropAugmentation(**SMALL)
    from_pil = augmentation(image, generator=_generator(2))
    from_tensor = augmentation(to_rgb_uint8(image).contiguous(), generator=_generator(2))
    assert all(torch.equal(a, b) for a, b in zip(from_pil, from_tensor, strict=True))
