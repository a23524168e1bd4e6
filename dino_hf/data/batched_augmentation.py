"""DINO multi-crop augmentation as batched tensor operations on the training device.

:class:`BatchedMultiCropAugmentation` takes a batch of decoded images, ``(B, 3, H, W)`` uint8 (or
float in ``[0, 1]``) on any device, and returns the crop-major views ``DinoForPreTraining`` takes::

    {"global_crops": (G, B, 3, S, S), "local_crops": (N, B, 3, s, s) or None}

Every view of every image has its own random parameters, drawn with the distributions of the
official ``DataAugmentationDINO`` (Caron et al. 2021, ``facebookresearch/dino`` ``main_dino.py``):

- random resized crop: torchvision ``RandomResizedCrop.get_params`` (10 attempts of an area
  fraction ``U(scale)`` and a log-uniform aspect ratio in ``(3/4, 4/3)``, then a central-crop
  fallback), sampled for all views at once;
- horizontal flip (p 0.5); colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)
  with p 0.8, its four operations in a per-view random order as ``ColorJitter`` does; grayscale
  (p 0.2); Gaussian blur with ``sigma ~ U(0.1, 2.0)`` with p 1.0 / 0.1 / 0.5 on global crop 1 /
  global crop 2 / local crops; solarisation (threshold 128) with p 0.2 on global crop 2 only;
  ImageNet normalisation.

Implementation choices
----------------------
*Resampling* is separable, antialiased bicubic (Keys ``a = -0.5``) — the filter the official PIL
``RandomResizedCrop(interpolation=BICUBIC)`` uses and that torchvision's
``resized_crop(..., antialias=True)`` reproduces for tensors. For each view we build its two
banded ``(out, in)`` weight matrices with PIL's coefficient rule (filter support scaled by the
downscaling factor, taps clipped to the crop box, rows normalised) and apply them with two batched
matrix multiplications: ``crop = W_y @ image @ W_x^T`` (the row matrices of all views of an image
in one product). The horizontal flip is folded into ``W_x`` for free. This matches
``torchvision.transforms.v2.functional.resized_crop(float_image, ..., BICUBIC, antialias=True)``
per view to float rounding (tested), whatever the per-view scale. We chose it over ``grid_sample`` (no antialiasing — local crops are downscaled by up to ~2.7x from a
256 px working image and alias — and its bicubic uses ``a = -0.75``) and over ``roi_align``
(bilinear only, although its adaptive sampling antialiases). ``interpolation="bilinear"`` uses the
same machinery with PIL's triangle filter. The matrices cost some dense FLOPs (tensor cores on a
GPU make them nearly free; on a CPU they are the largest single cost).

*Colour jitter in random order*: per slot (4), every view applies the operation its permutation
puts in that slot. Brightness, contrast and saturation are all ``blend(x, other, factor)`` (with
``other`` = black, the mean luma, the per-pixel luma) so one pass serves the three; hue runs on
the views whose slot holds hue. Operations run in float32 without re-quantising to 8 bits between
them (a documented deviation from PIL, which rounds after each operation).

*Gaussian blur* is a true separable Gaussian with per-view sigma in output pixels (reflect padding,
kernel ``2 * ceil(3 * sigma_max) + 1`` = 13 taps), as a grouped (depthwise) convolution with one
kernel per view. PIL's ``GaussianBlur(radius=sigma)`` approximates the same Gaussian with box
blurs; ``dino_hf.data.augmentation`` makes the same choice.

*No host syncs*: on accelerators an operation that applies to some views runs on all of them and
``torch.where`` keeps the result where it applies, and the few constants are copied to the device
once, so a call with ``generator=None`` (the device's default generator) or a generator on the
device never waits for the device (tested with ``torch.cuda.set_sync_debug_mode("error")``). A CPU
generator works too, but copying its draws to the device synchronises. On the CPU, where a sync
costs nothing, masked operations run only on the selected views.

The ``(B, 3, H, W)`` input is expected at a fixed working size. Two layouts work:

- letterbox (keeps the official crop distribution): resize each image so that its longer side is
  ``S`` (aspect kept), paste it at the top-left of an ``S x S`` canvas, and pass ``image_sizes``
  ``(B, 2)`` with each image's valid ``(height, width)``; crop boxes are then drawn relative to the
  whole image, as ``RandomResizedCrop`` draws them, and resampling never reads the padding;
- centre crop: resize the shorter side to ``S`` and centre-crop ``S x S`` (no ``image_sizes``);
  simpler, but crops only ever come from the central square.

Where it pays off: on a GPU the whole multi-crop costs a few milliseconds per batch, so loader
workers only decode. On the CPU, per-image augmentation in loader workers
(:class:`dino_hf.data.augmentation.MultiCropAugmentation`) is faster than this batched version (dense
resampling matrices cost more than torchvision's uint8 resize kernel there); see
``benchmarks/RESULTS.md`` (``bench_batched_augmentation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dino_hf.data.augmentation import LUMA_WEIGHTS, MultiCropRecipe

__all__ = [
    "BatchedMultiCropAugmentation",
    "BatchedViewParameters",
    "DeviceMultiCrop",
    "letterbox",
    "resampling_matrices",
]

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
# Layout of the uniforms drawn per view (one torch.rand call for the whole batch).
_U_SCALE = slice(0, _CROP_ATTEMPTS)
_U_RATIO = slice(_CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS)
_U_TOP, _U_LEFT, _U_FLIP, _U_JITTER = 20, 21, 22, 23
_U_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
_U_ORDER = slice(28, 32)
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = 32, 33, 34, 35
_UNIFORMS_PER_VIEW = 36


# --------------------------------------------------------------------------------------------------
# Random parameters
# --------------------------------------------------------------------------------------------------
@dataclass
class BatchedViewParameters:
    """Random decisions for every view of every image; each field has leading shape ``(V, B)``.

    Views are ordered global crops first, then local crops (``V = G + N``).

    Attributes:
        boxes: ``(V, B, 4)`` int64 ``(top, left, height, width)`` of each crop in input pixels.
        flip: ``(V, B)`` bool, horizontal flip.
        color_jitter: ``(V, B)`` bool, colour jitter applies.
        jitter_order: ``(V, B, 4)`` int64, a permutation of ``(BRIGHTNESS, CONTRAST, SATURATION, HUE)``.
        brightness, contrast, saturation: ``(V, B)`` float32 factors (1 = unchanged).
        hue: ``(V, B)`` float32 hue shift in turns (0 = unchanged).
        grayscale: ``(V, B)`` bool.
        blur: ``(V, B)`` bool, Gaussian blur applies.
        blur_sigma: ``(V, B)`` float32, the blur's standard deviation in output pixels (drawn for
            every view; used where ``blur``).
        solarize: ``(V, B)`` bool.
    """

    boxes: Tensor
    flip: Tensor
    color_jitter: Tensor
    jitter_order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor
    blur: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    def to(self, device: torch.device | str) -> BatchedViewParameters:
        """A copy with every tensor on ``device`` (non-blocking where possible)."""
        return BatchedViewParameters(
            **{field.name: getattr(self, field.name).to(device, non_blocking=True) for field in fields(self)}
        )

    def select_views(self, views: slice) -> BatchedViewParameters:
        """The parameters of a contiguous range of views (e.g. the global crops)."""
        return BatchedViewParameters(**{field.name: getattr(self, field.name)[views] for field in fields(self)})


def _sample_crop_boxes(
    uniforms: Tensor, heights: Tensor, widths: Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """torchvision ``RandomResizedCrop.get_params`` for many views at once.

    Args:
        uniforms: ``(V, B, _UNIFORMS_PER_VIEW)`` float64 uniforms in ``[0, 1)``.
        heights, widths: ``(B,)`` float64 valid image sizes.
        scale, ratio: area-fraction and aspect-ratio ranges.
    Returns:
        ``(V, B, 4)`` int64 ``(top, left, height, width)``.
    """
    area = (heights * widths).unsqueeze(-1)  # (B, 1), broadcast over (V, B, attempts)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[..., _U_SCALE])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect_ratio = torch.exp(log_low + (log_high - log_low) * uniforms[..., _U_RATIO])
    crop_widths = torch.round(torch.sqrt(target_area * aspect_ratio))  # round half to even, as Python
    crop_heights = torch.round(torch.sqrt(target_area / aspect_ratio))
    valid = (crop_widths > 0) & (crop_widths <= widths.unsqueeze(-1))
    valid &= (crop_heights > 0) & (crop_heights <= heights.unsqueeze(-1))
    first_valid = valid.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first True (0 when none)
    any_valid = valid.any(dim=-1)
    crop_width = crop_widths.gather(-1, first_valid).squeeze(-1)
    crop_height = crop_heights.gather(-1, first_valid).squeeze(-1)

    # Fallback: central crop with the aspect ratio clamped into `ratio`.
    in_ratio = widths / heights
    fallback_width = torch.where(
        in_ratio < min(ratio),
        widths,
        torch.where(in_ratio > max(ratio), torch.round(heights * max(ratio)), widths),
    )
    fallback_height = torch.where(
        in_ratio < min(ratio),
        torch.round(widths / min(ratio)),
        heights,
    )
    crop_width = torch.where(any_valid, crop_width, fallback_width)
    crop_height = torch.where(any_valid, crop_height, fallback_height)
    # top ~ randint(0, H - h + 1), left ~ randint(0, W - w + 1); centred for the fallback.
    top = torch.floor(uniforms[..., _U_TOP] * (heights - crop_height + 1)).clamp_max_(heights - crop_height)
    left = torch.floor(uniforms[..., _U_LEFT] * (widths - crop_width + 1)).clamp_max_(widths - crop_width)
    top = torch.where(any_valid, top, torch.div(heights - crop_height, 2, rounding_mode="floor"))
    left = torch.where(any_valid, left, torch.div(widths - crop_width, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_height, crop_width], dim=-1).to(torch.int64)


# --------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------
def _bicubic_filter(x: Tensor) -> Tensor:
    """Keys cubic convolution kernel with ``a = -0.5`` (PIL / torchvision antialias), support 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _triangle_filter(x: Tensor) -> Tensor:
    """Linear interpolation kernel, support 1."""
    return (1.0 - x.abs()).clamp_min_(0.0)


_FILTERS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "bicubic": (_bicubic_filter, 2.0),
    "bilinear": (_triangle_filter, 1.0),
}


def resampling_matrices(
    starts: Tensor,
    lengths: Tensor,
    output_size: int,
    input_size: int,
    interpolation: str = "bicubic",
    flip: Tensor | None = None,
) -> Tensor:
    """Antialiased 1-D resampling matrices of crops, PIL's coefficient rule, batched.

    Row ``j`` of a matrix holds the weights of the input pixels that make output pixel ``j`` of the
    crop ``[start, start + length)`` resized to ``output_size``: the filter is stretched by the
    downscaling factor ``max(length / output_size, 1)``, evaluated at pixel centres, limited to the
    crop and normalised — exactly ``torch.nn.functional.interpolate(..., antialias=True)`` /
    PIL ``Image.resize`` applied to the cropped image.

    Args:
        starts, lengths: ``(M,)`` crop offsets and sizes in input pixels (any numeric dtype).
        output_size: output length.
        input_size: length of the input axis.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        flip: optional ``(M,)`` bool; where true the output is mirrored (row ``j`` holds the weights
            of output pixel ``output_size - 1 - j``), which is how horizontal flips cost nothing.
    Returns:
        ``(M, output_size, input_size)`` float32, each row summing to 1.
    """
    filter_function, filter_support = _FILTERS[interpolation]
    device = starts.device
    starts = starts.to(torch.float64).view(-1, 1, 1)
    lengths = lengths.to(torch.float64).view(-1, 1, 1)
    scale = lengths / output_size  # (M, 1, 1)
    stretch = scale.clamp_min(1.0)
    support = filter_support * stretch
    output_index = torch.arange(output_size, device=device, dtype=torch.float64).view(1, -1, 1)
    if flip is not None:
        output_index = torch.where(flip.view(-1, 1, 1), output_size - 1 - output_index, output_index)
    centers = (output_index + 0.5) * scale
    first = torch.floor(centers - support + 0.5).clamp_min_(0.0)  # (M, out, 1), crop-relative
    last = torch.minimum(torch.floor(centers + support + 0.5), lengths)
    # Only a band of taps per output pixel can be non-zero: evaluate the filter there, then scatter.
    max_taps = min(math.ceil(2 * filter_support * max(input_size / output_size, 1.0)) + 2, input_size)
    positions = first + torch.arange(max_taps, device=device, dtype=torch.float64)  # (M, out, taps)
    weights = filter_function((positions - centers + 0.5) / stretch) * (positions < last)
    total = weights.sum(dim=-1, keepdim=True)
    weights = (weights / torch.where(total == 0, 1.0, total)).to(torch.float32)
    columns = (positions + starts).clamp_max_(input_size - 1).to(torch.int64)
    matrices = torch.zeros((weights.shape[0], output_size, input_size), dtype=torch.float32, device=device)
    # scatter_add: clamped out-of-band taps carry weight 0, so adding is exact.
    return matrices.scatter_add_(2, columns, weights)


def _resized_crops(
    images: Tensor,
    boxes: Tensor,
    flip: Tensor,
    output_size: int,
    interpolation: str,
) -> Tensor:
    """Crop, resize (antialiased) and optionally flip every view of every image.

    Args:
        images: ``(B, 3, H, W)`` float32 in ``[0, 1]``.
        boxes: ``(V, B, 4)`` int64 ``(top, left, height, width)``.
        flip: ``(V, B)`` bool.
        output_size: side of the square output crops.
    Returns:
        ``(V, B, 3, output_size, output_size)`` float32, clamped to ``[0, 1]`` like PIL's 8-bit output.
    """
    num_views, batch_size = boxes.shape[:2]
    height, width = images.shape[-2:]
    boxes = boxes.transpose(0, 1).reshape(-1, 4)  # image-major: (B*V, 4)
    flip = flip.transpose(0, 1).reshape(-1)
    rows = resampling_matrices(boxes[:, 0], boxes[:, 2], output_size, height, interpolation)  # (BV, s, H)
    columns = resampling_matrices(boxes[:, 1], boxes[:, 3], output_size, width, interpolation, flip)  # (BV, s, W)
    # Rows first, all views of an image in one product: (B, V*s, H) @ (B, H, 3*W) -> (B, V*s, 3*W).
    channels_inner = images.permute(0, 2, 1, 3).reshape(batch_size, height, 3 * width)
    resized = torch.bmm(rows.view(batch_size, num_views * output_size, height), channels_inner)
    # (B*V, s*3, W) is a free view; one product per view applies its column matrix to the 3 channels.
    resized = resized.view(batch_size * num_views, output_size * 3, width)
    crops = torch.bmm(resized, columns.transpose(1, 2))  # (B*V, s*3, s)
    crops = crops.view(batch_size, num_views, output_size, 3, output_size).permute(1, 0, 3, 2, 4)
    output = torch.empty(crops.shape, dtype=crops.dtype, device=crops.device)  # contiguous (V, B, 3, s, s)
    return torch.clamp(crops, 0.0, 1.0, out=output)


# --------------------------------------------------------------------------------------------------
# Colour operations on (M, 3, h, w) float32 in [0, 1] with per-view parameters (M,)
# --------------------------------------------------------------------------------------------------
def _luma(images: Tensor) -> Tensor:
    """``(M, 3, h, w)`` -> ``(M, 1, h, w)`` ITU-R 601-2 luma."""
    red, green, blue = images.unbind(1)
    luma = red * LUMA_WEIGHTS[0] + green * LUMA_WEIGHTS[1] + blue * LUMA_WEIGHTS[2]
    return luma.unsqueeze(1)


def _blend_operation(
    images: Tensor, operation: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor
) -> Tensor:
    """Brightness, contrast or saturation per view: ``clamp(f * x + (1 - f) * other, 0, 1)``.

    ``other`` is black (brightness), the image's mean luma (contrast) or the per-pixel luma
    (saturation), as torchvision's ``adjust_*`` functions blend.
    """
    luma = _luma(images)
    mean_luma = luma.mean(dim=(-3, -2, -1), keepdim=True)
    is_contrast = (operation == CONTRAST).view(-1, 1, 1, 1)
    other = torch.where((operation == SATURATION).view(-1, 1, 1, 1), luma, mean_luma * is_contrast)
    factor = torch.where(
        operation == BRIGHTNESS, brightness, torch.where(operation == CONTRAST, contrast, saturation)
    ).view(-1, 1, 1, 1)
    return (images - other).mul_(factor).add_(other).clamp_(0.0, 1.0)


def _adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Rotate the HSV hue by ``shifts`` ``(M,)`` turns, keeping saturation and value (``adjust_hue``).

    Closed form of RGB -> HSV -> RGB: ``c_n = V - C * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 H) mod 6``, ``n = 5, 3, 1`` for R, G, B.
    """
    red, green, blue = images.unbind(1)
    max_value = images.amax(dim=1)
    chroma = max_value - images.amin(dim=1)
    red_is_max = max_value == red
    green_is_max = max_value == green
    numerator = torch.where(red_is_max, green - blue, torch.where(green_is_max, blue - red, red - green))
    offset = torch.where(red_is_max, 0.0, torch.where(green_is_max, 2.0, 4.0))
    hue_sixths = numerator / torch.where(chroma > 0, chroma, 1.0) + offset + shifts.view(-1, 1, 1) * 6.0
    # (5, 3, 1) built on the device (a torch.tensor from a list would be a synchronising copy)
    offsets = torch.arange(5, 0, -2, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = torch.remainder(hue_sixths.unsqueeze(1) + offsets, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return max_value.unsqueeze(1) - ramp * chroma.unsqueeze(1)


def _gaussian_blur(images: Tensor, sigmas: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur, one sigma per view, reflect padding: two grouped convolutions.

    Args:
        images: ``(M, 3, h, w)``.
        sigmas: ``(M,)`` standard deviations in pixels.
        kernel_size: odd number of taps (clipped so that reflect padding fits the image).
    """
    num_views, channels, height, width = images.shape
    radius = min(kernel_size // 2, height - 1, width - 1)
    if radius <= 0:
        return images
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigmas.to(images.dtype).view(-1, 1)) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    # one kernel per (view, channel); expand+reshape rather than repeat_interleave, which may sync
    kernels = kernels.unsqueeze(1).expand(-1, channels, -1).reshape(num_views * channels, -1)  # (M*3, taps)
    taps = 2 * radius + 1
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    padded = padded.reshape(1, num_views * channels, height + 2 * radius, width + 2 * radius)
    blurred = F.conv2d(padded, kernels.view(-1, 1, 1, taps), groups=num_views * channels)
    blurred = F.conv2d(blurred, kernels.view(-1, 1, taps, 1), groups=num_views * channels)
    return blurred.view(num_views, channels, height, width)


def _apply_where(images: Tensor, mask: Tensor, function: Callable[..., Tensor], *arguments: Tensor) -> Tensor:
    """``function(images, *arguments)`` for the views where ``mask`` ``(M,)`` is true, others unchanged.

    On the CPU only the selected views are computed (a host sync is free there); elsewhere all views
    are computed and ``torch.where`` selects, so the call never waits for the device.
    """
    if images.device.type != "cpu":
        return torch.where(mask.view(-1, 1, 1, 1), function(images, *arguments), images)
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return images
    if index.numel() == images.shape[0]:
        return function(images, *arguments).contiguous()
    selected = function(images.index_select(0, index), *(argument.index_select(0, index) for argument in arguments))
    return images.index_copy_(0, index, selected.contiguous())


# --------------------------------------------------------------------------------------------------
# The augmentation
# --------------------------------------------------------------------------------------------------
class BatchedMultiCropAugmentation(MultiCropRecipe):
    """DINO multi-crop views of a batch of images, computed with batched tensor ops on their device.

    Arguments are those of :class:`dino_hf.data.augmentation.MultiCropRecipe` (defaults: the official
    recipe), plus:

    Args:
        interpolation: ``"bicubic"`` (official) or ``"bilinear"``; antialiased either way.
        output_dtype: dtype of the returned crops (float32; bfloat16 halves the transfer to the
            model under bf16 autocast).

    Call the instance on ``images`` ``(B, 3, H, W)`` (uint8, or float in ``[0, 1]``) on any device:

    ```python
    >>> augmentation = BatchedMultiCropAugmentation(global_crop_size=32, local_crop_size=16, num_local_crops=4)
    >>> images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    >>> views = augmentation(images, generator=torch.Generator().manual_seed(0))
    >>> views["global_crops"].shape, views["local_crops"].shape
    (torch.Size([2, 8, 3, 32, 32]), torch.Size([4, 8, 3, 16, 16]))
    ```
    """

    def __init__(
        self, interpolation: str = "bicubic", output_dtype: torch.dtype = torch.float32, **recipe: Any
    ) -> None:
        if interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, got {interpolation!r}.")
        super().__init__(**recipe)
        self.interpolation = interpolation
        self.output_dtype = output_dtype

    @classmethod
    def from_augmentation(cls, augmentation: object, **overrides: Any) -> BatchedMultiCropAugmentation:
        """The batched equivalent of a per-image ``MultiCropAugmentation`` (same recipe fields).

        Every :class:`~dino_hf.data.augmentation.MultiCropRecipe` field (and ``interpolation`` /
        ``output_dtype``) that ``augmentation`` has as an attribute is copied; ``overrides`` replace
        any of them.
        """
        names = [*MultiCropRecipe.field_names(), "interpolation", "output_dtype"]
        settings = {name: getattr(augmentation, name) for name in names if hasattr(augmentation, name)}
        return cls(**{**settings, **overrides})

    # ---- constants ---------------------------------------------------------------------------------
    def _constants(self, device: torch.device) -> dict[str, Tensor]:
        """Per-view probabilities and normalisation constants, copied to ``device`` once (no later syncs)."""
        key = str(device)
        cache = self.__dict__.setdefault("_constants_cache", {})
        if key not in cache:
            local = [self.local_blur_probability] * self.num_local_crops
            local_solarize = [self.local_solarize_probability] * self.num_local_crops
            constants = {
                "blur_probability": torch.tensor(list(self.global_blur_probabilities) + local, dtype=torch.float64),
                "solarize_probability": torch.tensor(
                    list(self.global_solarize_probabilities) + local_solarize, dtype=torch.float64
                ),
                "mean": torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1),
                "inverse_std": 1.0 / torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1),
            }
            cache[key] = {name: value.to(device) for name, value in constants.items()}
        return cache[key]

    def sample_parameters(
        self,
        batch_size: int,
        image_size: tuple[int, int] | Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> BatchedViewParameters:
        """Draw every view's random decisions for a batch, with the official distributions.

        Args:
            batch_size: ``B``.
            image_size: ``(H, W)`` shared by the batch, or a ``(B, 2)`` tensor of per-image valid
                ``(height, width)`` (images padded into a larger canvas at the top-left).
            generator: source of randomness (the default generator of ``device`` when ``None``);
                all uniforms come from one ``torch.rand`` call, so a seeded generator reproduces
                the parameters exactly.
            device: where to sample; defaults to the generator's device, else the CPU.
        Returns:
            :class:`BatchedViewParameters` with leading shape ``(G + N, B)`` on that device.
        """
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        num_views = self.num_crops
        uniforms = torch.rand(
            (num_views, batch_size, _UNIFORMS_PER_VIEW), generator=generator, device=device, dtype=torch.float64
        )
        if isinstance(image_size, Tensor):
            sizes = image_size.to(device=device, dtype=torch.float64).reshape(batch_size, 2)
            heights, widths = sizes[:, 0], sizes[:, 1]
        else:
            heights = torch.full((batch_size,), float(image_size[0]), dtype=torch.float64, device=device)
            widths = torch.full((batch_size,), float(image_size[1]), dtype=torch.float64, device=device)

        num_global = self.num_global_crops
        boxes = [_sample_crop_boxes(uniforms[:num_global], heights, widths, self.global_crop_scale, self.crop_ratio)]
        if self.num_local_crops:
            boxes.append(
                _sample_crop_boxes(uniforms[num_global:], heights, widths, self.local_crop_scale, self.crop_ratio)
            )

        def factor(index: int, strength: float) -> Tensor:  # U(max(0, 1 - s), 1 + s), as ColorJitter
            low = max(0.0, 1.0 - strength)
            return (low + (1.0 + strength - low) * uniforms[..., _U_FACTORS][..., index]).to(torch.float32)

        constants = self._constants(device)
        blur_probability = constants["blur_probability"].view(-1, 1)  # (V, 1)
        solarize_probability = constants["solarize_probability"].view(-1, 1)
        sigma_low, sigma_high = self.blur_sigma
        return BatchedViewParameters(
            boxes=torch.cat(boxes),
            flip=uniforms[..., _U_FLIP] < self.flip_probability,
            color_jitter=uniforms[..., _U_JITTER] < self.color_jitter_probability,
            # argsort of i.i.d. uniforms: a uniformly random permutation per view (ColorJitter's randperm)
            jitter_order=uniforms[..., _U_ORDER].argsort(dim=-1),
            brightness=factor(BRIGHTNESS, self.brightness),
            contrast=factor(CONTRAST, self.contrast),
            saturation=factor(SATURATION, self.saturation),
            hue=(self.hue * (2.0 * uniforms[..., _U_FACTORS][..., HUE] - 1.0)).to(torch.float32),
            grayscale=uniforms[..., _U_GRAY] < self.grayscale_probability,
            blur=uniforms[..., _U_BLUR] < blur_probability,
            blur_sigma=(sigma_low + (sigma_high - sigma_low) * uniforms[..., _U_SIGMA]).to(torch.float32),
            solarize=uniforms[..., _U_SOLARIZE] < solarize_probability,
        )

    # ---- pixels ----------------------------------------------------------------------------------
    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor | None]:
        """Multi-crop views of a batch.

        Args:
            images: ``(B, 3, H, W)`` uint8 (or float in ``[0, 1]``) on any device.
            generator: randomness for the parameters (on the images' device, or a CPU generator
                whose draws are moved there); ``None`` uses the device's default generator.
            image_sizes: optional ``(B, 2)`` valid ``(height, width)`` per image (top-left aligned
                in the ``H x W`` canvas); ``None`` means every image fills the canvas.
        Returns:
            ``{"global_crops": (G, B, 3, S, S), "local_crops": (N, B, 3, s, s) or None}`` normalised,
            in ``output_dtype``, on the images' device.
        """
        self._check_images(images)
        batch_size, _, height, width = images.shape
        image_size = image_sizes if image_sizes is not None else (height, width)
        device = generator.device if generator is not None else images.device
        parameters = self.sample_parameters(batch_size, image_size, generator=generator, device=device)
        return self.apply(images, parameters)

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (batch, 3, height, width) tensor, got {shape}.")
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}.")

    def apply(self, images: Tensor, parameters: BatchedViewParameters) -> dict[str, Tensor | None]:
        """Render the views described by ``parameters`` (see :meth:`__call__` for the shapes)."""
        self._check_images(images)
        parameters = parameters.to(images.device)
        if images.dtype == torch.uint8:
            pixels = images.to(torch.float32).div_(255.0)
        else:
            pixels = images.to(torch.float32)
        num_global = self.num_global_crops
        global_crops = self._render(pixels, parameters.select_views(slice(0, num_global)), self.global_crop_size)
        local_crops = None
        if self.num_local_crops:
            local_crops = self._render(pixels, parameters.select_views(slice(num_global, None)), self.local_crop_size)
        return {"global_crops": global_crops, "local_crops": local_crops}

    def _render(self, pixels: Tensor, parameters: BatchedViewParameters, size: int) -> Tensor:
        """Views of one resolution: ``(B, 3, H, W)`` float -> ``(V, B, 3, size, size)`` normalised."""
        crops = _resized_crops(pixels, parameters.boxes, parameters.flip, size, self.interpolation)
        num_views, batch_size = crops.shape[:2]
        views = crops.view(num_views * batch_size, 3, size, size)

        def flat(tensor: Tensor) -> Tensor:
            return tensor.reshape(num_views * batch_size, *tensor.shape[2:])

        jitter = flat(parameters.color_jitter)
        order = flat(parameters.jitter_order)
        brightness, contrast = flat(parameters.brightness), flat(parameters.contrast)
        saturation, hue = flat(parameters.saturation), flat(parameters.hue)
        for slot in range(4):
            operation = torch.where(jitter, order[:, slot], -1)  # -1: no jitter for this view
            is_blend = (operation >= BRIGHTNESS) & (operation <= SATURATION)
            views = _apply_where(views, is_blend, _blend_operation, operation, brightness, contrast, saturation)
            views = _apply_where(views, operation == HUE, _adjust_hue, hue)

        views = _apply_where(views, flat(parameters.grayscale), lambda x: _luma(x).expand(-1, 3, -1, -1))
        views = _apply_where(
            views,
            flat(parameters.blur),
            lambda x, sigma: _gaussian_blur(x, sigma, self.blur_kernel_size),
            flat(parameters.blur_sigma),
        )
        threshold = self.solarize_threshold / 255.0
        views = _apply_where(views, flat(parameters.solarize), lambda x: torch.where(x >= threshold, 1.0 - x, x))

        constants = self._constants(views.device)
        views = (views - constants["mean"]).mul_(constants["inverse_std"])
        return views.to(self.output_dtype).view(num_views, batch_size, 3, size, size)


# --------------------------------------------------------------------------------------------------
# Decode-only loading and the training-side wrapper (--augmentation_device cpu|cuda)
# --------------------------------------------------------------------------------------------------
def letterbox(pixels: Tensor, working_size: int) -> tuple[Tensor, Tensor]:
    """Fit one image into a ``working_size`` square for :class:`BatchedMultiCropAugmentation`.

    The image is shrunk (antialiased bicubic, aspect kept) so that its longer side is at most
    ``working_size`` — never enlarged, so small images lose nothing and are resampled only once, by
    the crops — and pasted at the top-left of a zero canvas.

    Args:
        pixels: ``(3, H, W)`` uint8.
        working_size: side ``S`` of the canvas.
    Returns:
        ``((3, S, S) uint8 canvas, (2,) int64 valid (height, width))``.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    _, height, width = pixels.shape
    scale = working_size / max(height, width)
    if scale < 1.0:
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
        pixels = TF.resize(pixels, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    canvas = pixels.new_zeros((3, working_size, working_size))
    canvas[:, :height, :width] = pixels
    return canvas, torch.tensor([height, width], dtype=torch.int64)


class DeviceMultiCrop:
    """Turns decode-only loader batches into multi-crop batches on the training device.

    ``{"images": (B, 3, S, S) uint8, "image_sizes": (B, 2)}`` (CPU) ->
    ``{"global_crops": (G, B, 3, s_g, s_g), "local_crops": (N, B, 3, s_l, s_l) or None}`` on ``device``.

    The random parameters come from a generator of its own on ``device``, seeded with ``seed``: the
    crops do not depend on (or disturb) the model's random streams (drop path), and
    :meth:`state_dict` makes a resumed run draw exactly the crops an uninterrupted one would.
    ``working_size`` (the loader's, recorded in the state) guards a resume against changed settings.
    """

    def __init__(
        self,
        augmentation: BatchedMultiCropAugmentation,
        device: torch.device | str,
        seed: int,
        working_size: int | None = None,
    ) -> None:
        self.augmentation = augmentation
        self.device = torch.device(device)
        self.working_size = working_size
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor | None]:
        images = batch["images"].to(self.device, non_blocking=True)
        image_sizes = batch["image_sizes"].to(self.device, non_blocking=True)
        return self.augmentation(images, generator=self.generator, image_sizes=image_sizes)

    def state_dict(self) -> dict[str, Tensor | str | int | None]:
        """The generator state (a CPU uint8 tensor) and the settings it belongs to (plain values)."""
        return {
            "generator": self.generator.get_state(),
            "device_type": self.device.type,
            "working_size": self.working_size,
        }

    def load_state_dict(self, state: dict[str, Tensor | str | int | None]) -> None:
        """Restore :meth:`state_dict`; a state of another device type or working size is refused."""
        saved = (state.get("device_type"), state.get("working_size"))
        if saved != (self.device.type, self.working_size):
            raise ValueError(
                f"The checkpoint's crops were drawn with --augmentation_device {saved[0]} and "
                f"--augmentation_working_size {saved[1]}, this run has {self.device.type} and {self.working_size}: "
                "resume with the settings it was trained with."
            )
        self.generator.set_state(state["generator"])
