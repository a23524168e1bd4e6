"""Tests of dino_hf.data.augmentation: the official DINO multi-crop recipe on uint8 tensors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from image_datasets import make_image
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from tiny_models import SMALL_MULTI_CROP as SMALL
from tiny_models import seeded_generator as _generator

from dino_hf.data.augmentation import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    SATURATION,
    MultiCropAugmentation,
    ViewParameters,
    _adjust_hue,
    _gaussian_blur,
)
from dino_hf.data.decoding import to_rgb_uint8

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
def test_defaults_are_the_official_recipe():
    augmentation = MultiCropAugmentation()
    assert (augmentation.global_crop_size, augmentation.local_crop_size, augmentation.num_local_crops) == (224, 96, 8)
    assert augmentation.global_crop_scale == (0.4, 1.0) and augmentation.local_crop_scale == (0.05, 0.4)
    assert augmentation.flip_probability == 0.5 and augmentation.color_jitter_probability == 0.8
    assert (augmentation.brightness, augmentation.contrast, augmentation.saturation, augmentation.hue) == (
        0.4,
        0.4,
        0.2,
        0.1,
    )
    assert augmentation.grayscale_probability == 0.2
    assert augmentation.global_blur_probabilities == (1.0, 0.1) and augmentation.local_blur_probability == 0.5
    assert augmentation.blur_sigma == (0.1, 2.0) and augmentation.blur_kernel_size == 13
    assert augmentation.global_solarize_probabilities == (0.0, 0.2) and augmentation.local_solarize_probability == 0
    assert augmentation.solarize_threshold == 128
    assert augmentation.num_global_crops == 2 and augmentation.num_crops == 10
    assert augmentation.mean == IMAGENET_DEFAULT_MEAN and augmentation.std == IMAGENET_DEFAULT_STD


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(global_blur_probabilities=(1.0,), global_solarize_probabilities=(0.0, 0.2)),
        dict(num_local_crops=-1),
        dict(local_crop_scale=(0.5, 0.2)),
        dict(blur_kernel_size=12),
        dict(hue=0.7),
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MultiCropAugmentation(**kwargs)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def test_views_shapes_dtypes_and_value_range():
    augmentation = MultiCropAugmentation(**SMALL)
    views = augmentation(make_image(3, 48), generator=_generator(0))
    assert len(views) == 5
    for index, view in enumerate(views):
        size = 32 if index < 2 else 16
        assert view.shape == (3, size, size) and view.dtype == torch.float32
        pixels = view * STD + MEAN  # back to [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert torch.isfinite(view).all()


def test_default_recipe_on_a_realistic_image():
    views = MultiCropAugmentation()(make_image(0, 120).resize((160, 120)), generator=_generator(1))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8


def test_seed_determinism():
    augmentation = MultiCropAugmentation(**SMALL)
    image = make_image(5, 40)
    first = augmentation(image, generator=_generator(123))
    second = augmentation(image, generator=_generator(123))
    third = augmentation(image, generator=_generator(124))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, third, strict=True))
    torch.manual_seed(7)
    fourth = augmentation(image)
    torch.manual_seed(7)
    fifth = augmentation(image)
    assert all(torch.equal(a, b) for a, b in zip(fourth, fifth, strict=True))


def test_no_local_crops():
    augmentation = MultiCropAugmentation(global_crop_size=24, local_crop_size=12, num_local_crops=0)
    views = [augmentation(make_image(i, 30), generator=_generator(i)) for i in range(3)]
    assert all(len(v) == 2 for v in views)
    global_views, local_views = augmentation.multi_crop(make_image(0, 30), generator=_generator(0))
    assert global_views.shape == (2, 3, 24, 24) and local_views is None


def test_multi_crop_returns_stacked_views():
    augmentation = MultiCropAugmentation(**SMALL)
    global_views, local_views = augmentation.multi_crop(make_image(1, 40), generator=_generator(3))
    assert global_views.shape == (2, 3, 32, 32) and local_views.shape == (3, 3, 16, 16)
    views = augmentation(make_image(1, 40), generator=_generator(3))
    assert torch.equal(global_views[1], views[1]) and torch.equal(local_views[0], views[2])


# ---------------------------------------------------------------------------------------------
# Tiny and extreme images (input types and modes: tests/data/test_decoding.py)
# ---------------------------------------------------------------------------------------------
def test_tiny_and_extreme_aspect_images():
    augmentation = MultiCropAugmentation(**SMALL)
    for size in [(2, 2), (200, 3), (3, 200)]:
        image = Image.new("RGB", size, (10, 200, 30))
        views = augmentation(image, generator=_generator(0))
        assert views[0].shape == (3, 32, 32) and torch.isfinite(torch.stack(views[:2])).all()


# ---------------------------------------------------------------------------------------------
# Random decisions: probabilities and ranges of the official recipe
# ---------------------------------------------------------------------------------------------
def _within(rate: float, probability: float, trials: int) -> bool:
    sigma = math.sqrt(max(probability * (1 - probability), 1e-12) / trials)
    return abs(rate - probability) <= 4.5 * sigma + 1e-12


def test_per_view_probabilities_and_ranges():
    augmentation = MultiCropAugmentation(num_local_crops=2)
    generator = _generator(2024)
    draws = 3000
    per_view: list[list[ViewParameters]] = [[] for _ in range(augmentation.num_crops)]
    for _ in range(draws):
        for index, view in enumerate(augmentation.sample_parameters(375, 500, generator)):
            per_view[index].append(view)
    expected_blur = [1.0, 0.1, 0.5, 0.5]
    expected_solarize = [0.0, 0.2, 0.0, 0.0]
    for index, views in enumerate(per_view):

        def rate(attribute: str, views: list[ViewParameters] = views) -> float:
            return sum(bool(getattr(v, attribute)) for v in views) / draws

        assert _within(rate("flip"), 0.5, draws)
        assert _within(rate("color_jitter"), 0.8, draws)
        assert _within(rate("grayscale"), 0.2, draws)
        assert _within(rate("solarize"), expected_solarize[index], draws)
        blur = sum(v.blur_sigma is not None for v in views) / draws
        assert _within(blur, expected_blur[index], draws), (index, blur)
        sigmas = [v.blur_sigma for v in views if v.blur_sigma is not None]
        assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0 and abs(np.mean(sigmas) - 1.05) < 0.05
        for attribute, low, high in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2)]:
            values = np.array([getattr(v, attribute) for v in views])
            assert values.min() >= low and values.max() <= high and abs(values.mean() - 1.0) < 0.02
        hues = np.array([v.hue for v in views])
        assert hues.min() >= -0.1 and hues.max() <= 0.1 and abs(hues.mean()) < 0.005
        orders = Counter(v.jitter_order for v in views)
        assert len(orders) == 24 and max(orders.values()) < 2 * draws / 24
        size = 224 if index < 2 else 96
        scale = (0.4, 1.0) if index < 2 else (0.05, 0.4)
        fractions = []
        for view in views:
            top, left, height, width = view.crop
            assert view.size == size
            assert 0 <= top and 0 <= left and top + height <= 375 and left + width <= 500
            assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
            fractions.append(height * width / (375 * 500))
        assert scale[0] - 0.01 <= min(fractions) and max(fractions) <= scale[1] + 0.01
        # same distribution as torchvision's RandomResizedCrop.get_params (which rejects crops that do not fit)
        torch.manual_seed(index)
        reference = [
            h * w / (375 * 500)
            for h, w in (
                T.RandomResizedCrop.get_params(torch.empty(1, 375, 500), list(scale), [3 / 4, 4 / 3])[2:]
                for _ in range(draws)
            )
        ]
        assert abs(np.mean(fractions) - np.mean(reference)) < 0.015
        assert abs(np.std(fractions) - np.std(reference)) < 0.015


def test_every_probability_is_a_parameter():
    augmentation = MultiCropAugmentation(
        num_local_crops=1,
        flip_probability=1.0,
        color_jitter_probability=0.0,
        grayscale_probability=1.0,
        global_blur_probabilities=(0.0, 0.0, 1.0),
        global_solarize_probabilities=(1.0, 0.0, 0.0),
        local_blur_probability=0.0,
        local_solarize_probability=1.0,
    )
    assert augmentation.num_global_crops == 3
    for _ in range(20):
        views = augmentation.sample_parameters(50, 60)
        assert [v.blur_sigma is not None for v in views] == [False, False, True, False]
        assert [v.solarize for v in views] == [True, False, False, True]
        assert all(v.flip and v.grayscale and not v.color_jitter for v in views)


# ---------------------------------------------------------------------------------------------
# Pixels: batched operations equal torchvision's per-view operations for the same decisions
# ---------------------------------------------------------------------------------------------
def _torchvision_view(image: torch.Tensor, view: ViewParameters, augmentation: MultiCropAugmentation):
    """One view rendered with plain torchvision v2 functional calls (the unbatched reference)."""
    x = F.resized_crop(
        image, *view.crop, size=[view.size, view.size], interpolation=F.InterpolationMode.BICUBIC, antialias=True
    )
    x = x.float() / 255
    if view.flip:
        x = F.horizontal_flip(x)
    if view.color_jitter:
        for operation in view.jitter_order:
            if operation == BRIGHTNESS:
                x = F.adjust_brightness(x, view.brightness)
            elif operation == CONTRAST:
                x = F.adjust_contrast(x, view.contrast)
            elif operation == SATURATION:
                x = F.adjust_saturation(x, view.saturation)
            elif operation == HUE:
                x = F.adjust_hue(x, view.hue)
    if view.grayscale:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if view.blur_sigma is not None:
        k = augmentation.blur_kernel_size
        x = F.gaussian_blur(x, [k, k], [view.blur_sigma, view.blur_sigma])
    if view.solarize:
        x = F.solarize(x, augmentation.solarize_threshold / 255)
    return F.normalize(x, list(augmentation.mean), list(augmentation.std))


@pytest.mark.parametrize("seed", range(6))
def test_batched_views_equal_torchvision_per_view(seed):
    augmentation = MultiCropAugmentation(num_local_crops=4, global_crop_size=40, local_crop_size=24)
    image = to_rgb_uint8(make_image(seed, 64).resize((72, 56)))
    parameters = augmentation.sample_parameters(56, 72, _generator(seed))
    global_views, local_views = augmentation.apply(image, parameters)
    ours = list(global_views) + list(local_views)
    for view, rendered in zip(parameters, ours, strict=True):
        reference = _torchvision_view(image, view, augmentation)
        assert torch.allclose(rendered, reference, atol=2e-4), (view, (rendered - reference).abs().max())


def test_hue_and_blur_kernels_match_torchvision():
    images = torch.rand(5, 3, 20, 17)
    images[0, :, :4] = 0.5  # grey pixels (zero chroma)
    images[1, 0] = images[1, 1]  # ties between max channels
    shifts = torch.tensor([0.1, -0.1, 0.05, -0.03, 0.0])
    ours = _adjust_hue(images, shifts)
    for i in range(5):
        assert torch.allclose(ours[i], F.adjust_hue(images[i], float(shifts[i])), atol=1e-5)
    sigmas = [0.1, 0.5, 1.0, 1.7, 2.0]
    blurred = _gaussian_blur(images, sigmas, 13)
    for i in range(5):
        assert torch.allclose(blurred[i], F.gaussian_blur(images[i], [13, 13], [sigmas[i]] * 2), atol=1e-5)


def _pil_official_view(image: Image.Image, view: ViewParameters) -> torch.Tensor:
    """One view with the official PIL operations (DataAugmentationDINO) for the same decisions."""
    top, left, height, width = view.crop
    x = image.resize((view.size, view.size), Image.BICUBIC, box=(left, top, left + width, top + height))
    if view.flip:
        x = x.transpose(Image.FLIP_LEFT_RIGHT)
    if view.color_jitter:
        for operation in view.jitter_order:
            if operation == BRIGHTNESS:
                x = ImageEnhance.Brightness(x).enhance(view.brightness)
            elif operation == CONTRAST:
                x = ImageEnhance.Contrast(x).enhance(view.contrast)
            elif operation == SATURATION:
                x = ImageEnhance.Color(x).enhance(view.saturation)
            elif operation == HUE:
                h, s, v = x.convert("HSV").split()
                h = Image.fromarray((np.asarray(h).astype(np.int16) + int(view.hue * 255)).astype(np.uint8), "L")
                x = Image.merge("HSV", (h, s, v)).convert("RGB")
    if view.grayscale:
        x = x.convert("L").convert("RGB")
    if view.blur_sigma is not None:
        x = x.filter(ImageFilter.GaussianBlur(radius=view.blur_sigma))
    if view.solarize:
        x = ImageOps.solarize(x, 128)
    tensor = torch.from_numpy(np.asarray(x).copy()).permute(2, 0, 1).float() / 255
    return (tensor - MEAN) / STD


def test_views_match_the_official_pil_operations():
    """Same decisions through PIL (8-bit, box-blur Gaussian approximation): close to ours on average."""
    augmentation = MultiCropAugmentation(num_local_crops=4, global_crop_size=48, local_crop_size=24)
    differences = []
    for seed in range(5):
        image = make_image(seed, 80)
        parameters = augmentation.sample_parameters(80, 80, _generator(seed))
        global_views, local_views = augmentation.apply(image, parameters)
        for view, rendered in zip(parameters, list(global_views) + list(local_views), strict=True):
            reference = _pil_official_view(image, view)
            differences.append((rendered - reference).abs().mean().item() * 0.226)  # in [0, 1] pixel units
    assert np.mean(differences) < 0.01 and max(differences) < 0.03, differences  # measured: 0.005, 0.012
