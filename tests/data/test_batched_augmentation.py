"""Tests of the on-device batched multi-crop augmentation (``dino_hf/data/batched_augmentation.py``).

The random parameters are checked statistically (thousands of draws, fixed seeds) against the
official probabilities, against torchvision's ``RandomResizedCrop`` rule, and against the per-image
``MultiCropAugmentation``; the pixels are checked view by view against torchvision's functional
ops driven by the same parameters, and on crafted inputs for flip, solarise, grayscale and blur.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from dino_hf.data.batched_augmentation import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    BatchedMultiCropAugmentation,
    BatchedViewParameters,
    _sample_crop_boxes,
    letterbox,
    resampling_matrices,
)

NUM_DRAWS = 4000  # images per statistical test; each has 2 global + 8 local views


def _images(batch_size: int = 6, height: int = 40, width: int = 40, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator)


def _tiny(**overrides) -> BatchedMultiCropAugmentation:
    settings = {"global_crop_size": 32, "local_crop_size": 16, "num_local_crops": 3, **overrides}
    return BatchedMultiCropAugmentation(**settings)


def _plain(size: int, **overrides) -> BatchedMultiCropAugmentation:
    """Whole-image crops, no random colour work, no normalisation: isolates one operation."""
    settings = {
        "global_crop_size": size,
        "num_local_crops": 0,
        "global_crop_scale": (1.0, 1.0),
        "crop_ratio": (1.0, 1.0),
        "flip_probability": 0.0,
        "color_jitter_probability": 0.0,
        "grayscale_probability": 0.0,
        "global_blur_probabilities": (0.0, 0.0),
        "global_solarize_probabilities": (0.0, 0.0),
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        **overrides,
    }
    return BatchedMultiCropAugmentation(**settings)


def _binomial_close(flags: torch.Tensor, probability: float) -> bool:
    """Observed rate within 5 standard errors of ``probability`` (exact for p in {0, 1})."""
    rate = flags.float().mean().item()
    if probability in (0.0, 1.0):
        return rate == probability
    return abs(rate - probability) <= 5 * math.sqrt(probability * (1 - probability) / flags.numel())


def _ks_statistic(first: torch.Tensor, second: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance between two 1-D samples."""
    values = torch.cat([first, second]).sort().values
    cdf_first = torch.searchsorted(first.sort().values, values, right=True) / first.numel()
    cdf_second = torch.searchsorted(second.sort().values, values, right=True) / second.numel()
    return (cdf_first - cdf_second).abs().max().item()


def _ks_threshold(n: int, m: int) -> float:
    """KS critical distance at significance 0.001."""
    return 1.95 * math.sqrt((n + m) / (n * m))


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, ranges, determinism
# ------------------------------------------------------------------------------------------------
def test_output_shapes_dtypes_and_range() -> None:
    augmentation = _tiny()
    views = augmentation(_images(), generator=torch.Generator().manual_seed(0))
    assert views["global_crops"].shape == (2, 6, 3, 32, 32)
    assert views["local_crops"].shape == (3, 6, 3, 16, 16)
    low = (0.0 - torch.tensor(augmentation.mean)) / torch.tensor(augmentation.std)
    high = (1.0 - torch.tensor(augmentation.mean)) / torch.tensor(augmentation.std)
    for crops in views.values():
        assert crops.dtype == torch.float32 and crops.is_contiguous()
        per_channel = crops.transpose(0, 2).reshape(3, -1)
        assert (per_channel.min(dim=1).values >= low - 1e-5).all()
        assert (per_channel.max(dim=1).values <= high + 1e-5).all()


def test_float_input_non_square_no_local_crops_and_output_dtype() -> None:
    augmentation = _tiny(num_local_crops=0, output_dtype=torch.bfloat16)
    images = _images(height=36, width=52).float() / 255.0
    views = augmentation(images)
    assert views["global_crops"].shape == (2, 6, 3, 32, 32)
    assert views["global_crops"].dtype == torch.bfloat16
    assert views["local_crops"] is None


def test_uint8_and_float_inputs_agree() -> None:
    augmentation = _tiny()
    images = _images()
    parameters = augmentation.sample_parameters(6, (40, 40), generator=torch.Generator().manual_seed(3))
    from_uint8 = augmentation.apply(images, parameters)
    from_float = augmentation.apply(images.float() / 255.0, parameters)
    for key in from_uint8:
        torch.testing.assert_close(from_uint8[key], from_float[key])


def test_seeded_generator_is_deterministic() -> None:
    augmentation = _tiny()
    images = _images()
    first = augmentation(images, generator=torch.Generator().manual_seed(7))
    second = augmentation(images, generator=torch.Generator().manual_seed(7))
    third = augmentation(images, generator=torch.Generator().manual_seed(8))
    for key in ("global_crops", "local_crops"):
        assert torch.equal(first[key], second[key])
        assert not torch.equal(first[key], third[key])


def test_invalid_inputs_raise() -> None:
    augmentation = _tiny()
    with pytest.raises(ValueError, match="batch, 3, height, width"):
        augmentation(torch.zeros(3, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or floating"):
        augmentation(torch.zeros(2, 3, 40, 40, dtype=torch.int32))
    with pytest.raises(ValueError, match="interpolation"):
        _tiny(interpolation="nearest")
    with pytest.raises(ValueError, match="one entry per global crop"):
        _tiny(global_blur_probabilities=(1.0,), global_solarize_probabilities=(0.0, 0.2))


# ------------------------------------------------------------------------------------------------
# Random parameters: official distributions
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_parameters() -> BatchedViewParameters:
    augmentation = BatchedMultiCropAugmentation()  # official recipe: 2 global + 8 local
    return augmentation.sample_parameters(NUM_DRAWS, (256, 256), generator=torch.Generator().manual_seed(0))


def test_official_probabilities(official_parameters: BatchedViewParameters) -> None:
    p = official_parameters
    assert p.flip.shape == (10, NUM_DRAWS)
    assert _binomial_close(p.flip, 0.5)
    assert _binomial_close(p.color_jitter, 0.8)
    assert _binomial_close(p.grayscale, 0.2)
    # Blur: always on global crop 1, p 0.1 on global crop 2, p 0.5 on every local crop.
    assert _binomial_close(p.blur[0], 1.0)
    assert _binomial_close(p.blur[1], 0.1)
    assert _binomial_close(p.blur[2:], 0.5)
    # Solarisation: p 0.2 on global crop 2 only.
    assert _binomial_close(p.solarize[0], 0.0)
    assert _binomial_close(p.solarize[1], 0.2)
    assert _binomial_close(p.solarize[2:], 0.0)
    # Decisions of different operations are independent draws.
    joint = (p.flip & p.grayscale).float().mean().item()
    assert abs(joint - 0.1) < 5 * math.sqrt(0.1 * 0.9 / p.flip.numel())


def test_official_factor_ranges(official_parameters: BatchedViewParameters) -> None:
    p = official_parameters
    for values, low, high in (
        (p.brightness, 0.6, 1.4),
        (p.contrast, 0.6, 1.4),
        (p.saturation, 0.8, 1.2),
        (p.hue, -0.1, 0.1),
        (p.blur_sigma, 0.1, 2.0),
    ):
        assert values.min().item() >= low and values.max().item() <= high
        uniform = low + (high - low) * torch.rand(values.numel(), generator=torch.Generator().manual_seed(1))
        assert _ks_statistic(values.flatten().double(), uniform.double()) < _ks_threshold(
            values.numel(), values.numel()
        )


def test_jitter_order_is_a_uniform_random_permutation(official_parameters: BatchedViewParameters) -> None:
    order = official_parameters.jitter_order
    assert torch.equal(order.sort(dim=-1).values, torch.arange(4).expand_as(order))
    for slot in range(4):
        for operation in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
            assert _binomial_close(order[..., slot] == operation, 0.25)
    # All 24 orders occur, each about 1/24 of the time.
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(-1).flatten()
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].float()
    assert counts.numel() == 24
    expected = codes.numel() / 24
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


def _torchvision_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], uniforms: list[float]
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` written out in Python, fed with the batched layout's uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[attempt])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniforms[10 + attempt])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(uniforms[20] * (height - h + 1)), int(uniforms[21] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(
    "height, width, scale",
    [(256, 256, (0.05, 0.4)), (48, 80, (0.4, 1.0)), (12, 200, (0.9, 1.0)), (300, 9, (0.5, 1.0))],
)
def test_crop_boxes_follow_the_torchvision_rule_exactly(height: int, width: int, scale: tuple[float, float]) -> None:
    """Same uniforms -> same boxes as torchvision's algorithm, including the central-crop fallback."""
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    uniforms = torch.rand((1, 300, 36), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    boxes = _sample_crop_boxes(
        uniforms,
        torch.full((300,), float(height), dtype=torch.float64),
        torch.full((300,), float(width), dtype=torch.float64),
        scale,
        ratio,
    )
    expected = [_torchvision_crop_box(height, width, scale, ratio, u) for u in uniforms[0].tolist()]
    assert boxes[0].tolist() == [list(box) for box in expected]


def test_crop_area_distribution_matches_torchvision_random_resized_crop() -> None:
    """Area fractions and aspect ratios against torchvision's own sampler (different RNG streams)."""
    from torchvision.transforms import RandomResizedCrop

    augmentation = BatchedMultiCropAugmentation(num_local_crops=1)
    parameters = augmentation.sample_parameters(2000, (64, 96), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(6)
    image = torch.zeros(3, 64, 96)
    for view, scale in ((0, augmentation.global_crop_scale), (2, augmentation.local_crop_scale)):
        reference = torch.tensor(
            [RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(2000)],
            dtype=torch.float64,
        )
        ours = parameters.boxes[view].double()
        for column in (2, 3):  # height, width
            assert _ks_statistic(ours[:, column], reference[:, column]) < _ks_threshold(2000, 2000)
        area_ours = ours[:, 2] * ours[:, 3] / (64 * 96)
        area_reference = reference[:, 2] * reference[:, 3] / (64 * 96)
        assert _ks_statistic(area_ours, area_reference) < _ks_threshold(2000, 2000)


def test_image_sizes_keep_crops_inside_each_valid_region() -> None:
    augmentation = _tiny()
    sizes = torch.tensor([[40, 40], [20, 40], [40, 12], [9, 9]] * 20)
    parameters = augmentation.sample_parameters(80, sizes, generator=torch.Generator().manual_seed(2))
    top, left, height, width = parameters.boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (height > 0).all() and (width > 0).all()
    assert (top + height <= sizes[:, 0]).all()
    assert (left + width <= sizes[:, 1]).all()
    images = torch.zeros(80, 3, 40, 40, dtype=torch.uint8)
    views = augmentation(images, generator=torch.Generator().manual_seed(2), image_sizes=sizes)
    assert views["global_crops"].shape == (2, 80, 3, 32, 32)


# ------------------------------------------------------------------------------------------------
# Against the per-image implementation (dino_hf/data/augmentation.py)
# ------------------------------------------------------------------------------------------------
def test_parameters_match_the_per_image_multi_crop_augmentation() -> None:
    augmentation_module = pytest.importorskip("dino_hf.data.augmentation")
    per_image = augmentation_module.MultiCropAugmentation()
    batched = BatchedMultiCropAugmentation.from_augmentation(per_image)
    assert batched.num_local_crops == per_image.num_local_crops
    num_images = 1500
    generator = torch.Generator().manual_seed(11)
    reference = [per_image.sample_parameters(256, 320, generator) for _ in range(num_images)]
    ours = batched.sample_parameters(num_images, (256, 320), generator=torch.Generator().manual_seed(12))
    for view in (0, 1, 2):
        boxes = torch.tensor([views[view].crop for views in reference], dtype=torch.float64)
        area_reference = boxes[:, 2] * boxes[:, 3] / (256 * 320)
        area_ours = ours.boxes[view, :, 2].double() * ours.boxes[view, :, 3] / (256 * 320)
        assert _ks_statistic(area_ours, area_reference) < _ks_threshold(num_images, num_images)
        for name in ("flip", "color_jitter", "grayscale", "solarize"):
            rate_reference = sum(bool(getattr(views[view], name)) for views in reference) / num_images
            rate_ours = getattr(ours, name)[view].float().mean().item()
            assert abs(rate_ours - rate_reference) < 0.06, (view, name)
        blur_reference = sum(views[view].blur_sigma is not None for views in reference) / num_images
        assert abs(ours.blur[view].float().mean().item() - blur_reference) < 0.06


def test_output_statistics_match_the_per_image_multi_crop_augmentation() -> None:
    """Per-view-type mean and spread of the normalised pixels agree with the per-image pipeline."""
    augmentation_module = pytest.importorskip("dino_hf.data.augmentation")
    per_image = augmentation_module.MultiCropAugmentation(global_crop_size=32, local_crop_size=16, num_local_crops=4)
    batched = BatchedMultiCropAugmentation.from_augmentation(per_image)
    # Smooth colourful images so that crops, jitter and blur all change the statistics.
    rows = torch.linspace(0, 1, 48).view(1, 1, 48, 1)
    columns = torch.linspace(0, 1, 48).view(1, 1, 1, 48)
    phase = torch.rand(160, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 6.28
    images = ((torch.sin(phase + 5 * rows + 3 * columns * phase) + 1) * 127.5).to(torch.uint8)
    generator = torch.Generator().manual_seed(1)
    reference_views = [per_image.multi_crop(image, generator) for image in images]
    reference_global = torch.stack([views[0] for views in reference_views], dim=1)
    reference_local = torch.stack([views[1] for views in reference_views], dim=1)
    ours = batched(images, generator=torch.Generator().manual_seed(2))
    for ours_views, reference in ((ours["global_crops"], reference_global), (ours["local_crops"], reference_local)):
        # per-view means / standard deviations over each crop, then compared as distributions
        for statistic in (lambda x: x.mean(dim=(-3, -2, -1)), lambda x: x.std(dim=(-3, -2, -1))):
            ours_values, reference_values = statistic(ours_views).flatten(), statistic(reference).flatten()
            distance = _ks_statistic(ours_values.double(), reference_values.double())
            assert distance < _ks_threshold(ours_values.numel(), reference_values.numel())


# ------------------------------------------------------------------------------------------------
# Pixels: view by view against torchvision's functional ops
# ------------------------------------------------------------------------------------------------
_TORCHVISION_JITTER = {
    BRIGHTNESS: lambda image, view: TF.adjust_brightness(image, view["brightness"]),
    CONTRAST: lambda image, view: TF.adjust_contrast(image, view["contrast"]),
    SATURATION: lambda image, view: TF.adjust_saturation(image, view["saturation"]),
    HUE: lambda image, view: TF.adjust_hue(image, view["hue"]),
}


def _torchvision_view(
    augmentation: BatchedMultiCropAugmentation, image: torch.Tensor, view: dict, size: int
) -> torch.Tensor:
    """One view rendered with torchvision's functional ops in the official order."""
    top, left, height, width = view["boxes"]
    output = TF.resized_crop(
        image, top, left, height, width, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
    ).clamp(0, 1)
    if view["flip"]:
        output = TF.horizontal_flip(output)
    if view["color_jitter"]:
        for operation in view["jitter_order"]:
            output = _TORCHVISION_JITTER[operation](output, view)
    if view["grayscale"]:
        output = TF.rgb_to_grayscale(output, num_output_channels=3)
    if view["blur"]:
        output = TF.gaussian_blur(output, [augmentation.blur_kernel_size] * 2, [view["blur_sigma"]] * 2)
    if view["solarize"]:
        output = TF.solarize(output, augmentation.solarize_threshold / 255.0)
    return TF.normalize(output, list(augmentation.mean), list(augmentation.std))


def _forced_parameters(augmentation: BatchedMultiCropAugmentation, batch_size: int) -> BatchedViewParameters:
    """Random parameters with every operation switched on for half of the views (coverage)."""
    parameters = augmentation.sample_parameters(batch_size, (40, 40), generator=torch.Generator().manual_seed(9))
    on = torch.arange(batch_size) % 2 == 0
    for name in ("color_jitter", "grayscale", "blur", "solarize"):
        setattr(parameters, name, on.expand_as(parameters.flip).clone())
    parameters.grayscale[:, ::4] = False  # jitter without grayscale on some views
    return parameters


def test_views_match_torchvision_functional_ops() -> None:
    augmentation = _tiny()
    images = _images(batch_size=8)
    parameters = _forced_parameters(augmentation, 8)
    views = augmentation.apply(images, parameters)
    pixels = images.float() / 255.0
    for index in range(augmentation.num_crops):
        is_global = index < augmentation.num_global_crops
        crops = views["global_crops"][index] if is_global else views["local_crops"][index - 2]
        size = augmentation.global_crop_size if is_global else augmentation.local_crop_size
        for sample in range(8):
            view = {
                name: getattr(parameters, name)[index, sample].tolist()
                for name in (
                    "boxes",
                    "flip",
                    "color_jitter",
                    "jitter_order",
                    "brightness",
                    "contrast",
                    "saturation",
                    "hue",
                    "grayscale",
                    "blur",
                    "blur_sigma",
                    "solarize",
                )
            }
            expected = _torchvision_view(augmentation, pixels[sample], view, size)
            torch.testing.assert_close(crops[sample], expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resampling_matrices_equal_torchvision_antialiased_resize(interpolation: str) -> None:
    """Per-view crop+resize (up- and downscaling) equals torchvision's antialiased resized_crop."""
    mode = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR}[interpolation]
    image = torch.rand(3, 50, 50, generator=torch.Generator().manual_seed(0))
    for top, left, height, width, size in ((0, 0, 50, 50, 20), (5, 7, 12, 30, 24), (20, 3, 29, 9, 16)):
        rows = resampling_matrices(torch.tensor([top]), torch.tensor([height]), size, 50, interpolation)[0]
        columns = resampling_matrices(torch.tensor([left]), torch.tensor([width]), size, 50, interpolation)[0]
        ours = rows @ image @ columns.T
        expected = TF.resized_crop(image, top, left, height, width, [size, size], interpolation=mode, antialias=True)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Crafted inputs
# ------------------------------------------------------------------------------------------------
def test_whole_image_crop_without_operations_is_identity() -> None:
    images = _images(batch_size=3, height=24, width=24)
    views = _plain(24)(images)
    torch.testing.assert_close(views["global_crops"][0], images.float() / 255.0, atol=1e-6, rtol=0)


def test_flip_mirrors_the_image() -> None:
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    images[..., 8:] = 255  # right half white
    views = _plain(16, flip_probability=1.0)(images)["global_crops"]
    assert (views[..., :8] > 0.999).all() and (views[..., 8:] < 0.001).all()
    unflipped = _plain(16, flip_probability=0.0)(images)["global_crops"]
    assert torch.equal(unflipped, images.float().div(255).expand_as(unflipped))


def test_solarize_inverts_values_at_or_above_128() -> None:
    images = torch.tensor([100, 127, 128, 200], dtype=torch.uint8).view(1, 1, 1, 4).expand(5, 3, 4, 4).contiguous()
    views = _plain(4, global_solarize_probabilities=(1.0, 0.0))(images)["global_crops"]
    expected = torch.tensor([100, 127, 255 - 128, 255 - 200], dtype=torch.float32) / 255.0
    torch.testing.assert_close(views[0], expected.expand(5, 3, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(views[1], images.float() / 255.0, atol=1e-6, rtol=0)  # global 2: p 0 here


def test_grayscale_makes_channels_equal_to_luma() -> None:
    images = _images(batch_size=4, height=8, width=8)
    views = _plain(8, grayscale_probability=1.0)(images)["global_crops"][0]
    luma = (images.float() / 255.0 * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    for channel in range(3):
        torch.testing.assert_close(views[:, channel], luma, atol=1e-5, rtol=0)


def test_blur_spreads_an_impulse_as_a_gaussian_of_the_sampled_sigma() -> None:
    images = torch.zeros(64, 3, 31, 31, dtype=torch.uint8)
    images[:, :, 15, 15] = 255
    augmentation = _plain(31, global_blur_probabilities=(1.0, 0.0))
    parameters = augmentation.sample_parameters(64, (31, 31), generator=torch.Generator().manual_seed(0))
    blurred = augmentation.apply(images, parameters)["global_crops"][0, :, 0]  # (64, 31, 31)
    torch.testing.assert_close(blurred.sum(dim=(-2, -1)), torch.full((64,), 1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(blurred, blurred.flip(-1))  # symmetric
    offsets = torch.arange(-15, 16, dtype=torch.float32)
    row_profile = blurred.sum(dim=-2)  # marginal along the columns
    variance = (row_profile * offsets**2).sum(-1)
    sigma = parameters.blur_sigma[0].view(-1, 1)
    # Variance of the 13-tap sampled Gaussian kernel (radius 6 = 3 sigma_max) of each sample's sigma.
    taps = torch.arange(-6, 7, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    expected_variance = (kernel * taps**2).sum(-1) / kernel.sum(-1)
    torch.testing.assert_close(variance, expected_variance, atol=1e-4, rtol=1e-4)
    assert (variance.sqrt() - sigma.squeeze(1)).abs()[sigma.squeeze(1) > 0.6].max() < 0.02
    assert not torch.equal(blurred, blurred[:1].expand_as(blurred))  # sigma differs per sample


def test_from_augmentation_copies_the_recipe_and_accepts_overrides() -> None:
    class Recipe:
        global_crop_size = 48
        local_crop_size = 24
        num_local_crops = 5
        local_blur_probability = 0.25

    batched = BatchedMultiCropAugmentation.from_augmentation(Recipe(), num_local_crops=6)
    assert (batched.global_crop_size, batched.local_crop_size) == (48, 24)
    assert batched.num_local_crops == 6 and batched.local_blur_probability == 0.25


# ------------------------------------------------------------------------------------------------
# Accelerator
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_matches_cpu_for_the_same_parameters() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    augmentation = _tiny()
    images = _images(batch_size=16)
    parameters = _forced_parameters(augmentation, 16)
    on_cpu = augmentation.apply(images, parameters)
    on_cuda = augmentation.apply(images.cuda(), parameters.to("cuda"))
    for key in on_cpu:
        torch.testing.assert_close(on_cuda[key].cpu(), on_cpu[key], atol=3e-3, rtol=0)  # cuDNN may use TF32
    # Sampling on the device with a CUDA generator is deterministic too.
    on_device = images.cuda()
    first = augmentation(on_device, generator=torch.Generator("cuda").manual_seed(0))
    second = augmentation(on_device, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(first["global_crops"], second["global_crops"])
    assert first["global_crops"].device.type == "cuda"


@pytest.mark.gpu
def test_cuda_call_never_synchronises_with_the_host() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    augmentation = _tiny()
    images = _images(batch_size=16).cuda()
    augmentation(images)  # first call per device copies a few constants
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = augmentation(images, generator=generator)
        views = augmentation(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views["local_crops"].shape == (3, 16, 3, 16, 16)


def test_device_multi_crop_resumes_its_crops_and_refuses_other_settings():
    from dino_hf.data.batched_augmentation import DeviceMultiCrop

    augmentation = BatchedMultiCropAugmentation(global_crop_size=16, local_crop_size=8, num_local_crops=2)
    batch = {
        "images": torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8),
        "image_sizes": torch.tensor([[24, 24], [12, 24], [24, 20]]),
    }
    crops = DeviceMultiCrop(augmentation, "cpu", seed=3, working_size=24)
    crops(batch)
    state = crops.state_dict()
    expected = crops(batch)
    resumed = DeviceMultiCrop(augmentation, "cpu", seed=99, working_size=24)
    resumed.load_state_dict(state)
    actual = resumed(batch)
    assert torch.equal(actual["global_crops"], expected["global_crops"])
    assert torch.equal(actual["local_crops"], expected["local_crops"])
    with pytest.raises(ValueError, match="--augmentation_working_size 24"):
        DeviceMultiCrop(augmentation, "cpu", seed=3, working_size=32).load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Decode-only loading: the letterboxed working images
# ------------------------------------------------------------------------------------------------
def test_letterbox_keeps_the_aspect_and_never_enlarges():
    image = torch.randint(0, 256, (3, 30, 60), dtype=torch.uint8)
    canvas, size = letterbox(image, 40)
    assert canvas.shape == (3, 40, 40) and size.tolist() == [20, 40]
    expected = TF.resize(image, [20, 40], interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(canvas[:, :20, :40], expected) and canvas[:, 20:].eq(0).all()
    canvas, size = letterbox(image, 64)  # larger than the image: pasted unchanged
    assert size.tolist() == [30, 60] and torch.equal(canvas[:, :30, :60], image)
