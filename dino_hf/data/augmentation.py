"""DINO multi-crop augmentation on uint8 tensors with torchvision ``transforms.v2``.

:class:`MultiCropAugmentation` reproduces the official ``DataAugmentationDINO`` (Caron et al. 2021,
``facebookresearch/dino`` ``main_dino.py``) operation for operation and probability for probability,
but runs faster than the PIL original:

- the image is decoded / converted once to a ``(3, H, W)`` uint8 tensor in channels-last memory;
- every view's random-resized crop runs on that uint8 tensor (torchvision's antialiased bicubic
  uint8 kernel) *before* any colour work, so colour work only touches crop-sized pixels;
- the views of one resolution are stacked and every later operation (flip, colour jitter in
  per-view random order, grayscale, Gaussian blur, solarisation, normalisation) runs batched over
  the views with per-view parameters, in float32 in ``[0, 1]``.

The random decisions are separate from the pixel work: :meth:`MultiCropAugmentation.sample_parameters`
returns one :class:`ViewParameters` per view (inspectable, testable), :meth:`MultiCropAugmentation.apply`
renders them. Differences to the PIL original that do not change the distribution of the recipe:

- colour operations run in float32 without re-quantising to 8 bits between operations;
- Gaussian blur is a true (separable, reflect-padded) Gaussian with standard deviation ``sigma`` in
  output-crop pixels, as ``PIL.ImageFilter.GaussianBlur(radius=sigma)`` intends (PIL approximates it
  with three box blurs). torchvision needs a kernel size: we use ``2 * ceil(3 * sigma_max) + 1``
  (13 px for the official ``sigma_max = 2``), which covers +-3 sigma for every sampled sigma; smaller
  sigmas simply have negligible outer taps.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as torch_functional
import torchvision.transforms.v2.functional as F
from torch import Tensor

from dino_hf.data.decoding import to_rgb_uint8

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "MultiCropAugmentation",
    "MultiCropRecipe",
    "ViewParameters",
]

IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale (PIL uses the same weights in integer form).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
# Colour-jitter operations, in the order torchvision's ColorJitter names them.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_RESIZED_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
_UNIFORMS_PER_VIEW = 4 * _RESIZED_CROP_ATTEMPTS + 15


# --------------------------------------------------------------------------------------------------
# Random parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewParameters:
    """Random decisions of one view (what ``DataAugmentationDINO`` would draw for it).

    Attributes:
        crop: ``(top, left, height, width)`` of the crop in source-image pixels.
        size: side of the square output crop in pixels.
        flip: horizontal flip.
        color_jitter: whether colour jitter applies (then the four factors below are used).
        jitter_order: permutation of ``(BRIGHTNESS, CONTRAST, SATURATION, HUE)`` = ``(0, 1, 2, 3)``.
        brightness, contrast, saturation: multiplicative factors (1 = unchanged).
        hue: hue shift in fractions of a turn (0 = unchanged).
        grayscale: convert to 3-channel grayscale.
        blur_sigma: Gaussian blur standard deviation in output pixels, ``None`` for no blur.
        solarize: invert pixels at or above the solarisation threshold.
    """

    crop: tuple[int, int, int, int]
    size: int
    flip: bool
    color_jitter: bool
    jitter_order: tuple[int, int, int, int]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def _resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], uniforms: list[float]
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` driven by pre-drawn uniforms (4 per attempt)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(_RESIZED_CROP_ATTEMPTS):
        u_scale, u_ratio, u_top, u_left = uniforms[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = min(int(u_top * (height - crop_height + 1)), height - crop_height)
            left = min(int(u_left * (width - crop_width + 1)), width - crop_width)
            return top, left, crop_height, crop_width
    # Fallback to a central crop, as torchvision does.
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height, crop_width = height, int(round(height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


# --------------------------------------------------------------------------------------------------
# Batched pixel operations on float (n, 3, h, w) in [0, 1] with per-view factors (n,)
# --------------------------------------------------------------------------------------------------
def _per_view(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype).view(-1, 1, 1, 1)


def _grayscale(images: Tensor) -> Tensor:
    """(n, 3, h, w) -> (n, 1, h, w) luma."""
    red, green, blue = images.unbind(1)
    gray = red.mul(LUMA_WEIGHTS[0]).add_(green, alpha=LUMA_WEIGHTS[1]).add_(blue, alpha=LUMA_WEIGHTS[2])
    return gray.unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    """``factors * images + (1 - factors) * other`` clamped to [0, 1] (torchvision's ``_blend``)."""
    return (images - other).mul_(factors).add_(other).clamp_(0.0, 1.0)


def _adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    return images.mul(factors).clamp_(0.0, 1.0)


def _adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    mean = _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factors)


def _adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    return _blend(images, _grayscale(images), factors)


# Pure-hue ramps for H in sixths of a turn, H in [0, 6): R = clamp(|H - 3| - 1, 0, 1),
# G = clamp(2 - |H - 2|, 0, 1), B = clamp(2 - |H - 4|, 0, 1), written as clamp(s * |H - c| + t, 0, 1).
_HUE_RAMP_CENTER = torch.tensor([3.0, 2.0, 4.0]).view(1, 3, 1, 1)
_HUE_RAMP_SLOPE = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
_HUE_RAMP_OFFSET = torch.tensor([-1.0, 2.0, 2.0]).view(1, 3, 1, 1)


def _adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Rotate the HSV hue by ``shifts`` (n,) or (n, 1, 1, 1) turns, keeping value and saturation (torchvision ``adjust_hue``).

    Closed form instead of an RGB->HSV->RGB round trip: hue H (in sixths) from the max channel,
    then ``rgb = min + chroma * pure_hue(H + 6 * shift)``. Only elementwise arithmetic on planes
    (no ``torch.where``/``max(dim)`` with indices, which are slow on CPU), so it is faster than
    torchvision's (benchmarks/RESULTS.md, "Figures from code comments").
    """
    red, green, blue = images.unbind(1)
    max_value = images.amax(dim=1)
    min_value = images.amin(dim=1)
    chroma = max_value - min_value
    red_is_max = (max_value == red).to(images.dtype)
    green_is_max = (max_value == green).to(images.dtype).mul_(1.0 - red_is_max)
    blue_is_max = 1.0 - red_is_max - green_is_max
    hue_sixths = (green - blue).mul_(red_is_max)
    hue_sixths.addcmul_(blue - red, green_is_max).addcmul_(red - green, blue_is_max)
    hue_sixths.div_(chroma.clamp_min(1e-12))  # grey pixels (chroma 0) have numerator 0
    hue_sixths.add_(green_is_max, alpha=2.0).add_(blue_is_max, alpha=4.0)
    hue_sixths.add_(shifts.view(-1, 1, 1) * 6.0).remainder_(6.0)
    pure = (hue_sixths.unsqueeze(1) - _HUE_RAMP_CENTER).abs_().mul_(_HUE_RAMP_SLOPE)
    pure = pure.add_(_HUE_RAMP_OFFSET).clamp_(0.0, 1.0)
    return pure.mul_(chroma.unsqueeze(1)).add_(min_value.unsqueeze(1))


def _solarize(images: Tensor, threshold: float) -> Tensor:
    """Invert values at or above ``threshold`` (``x -> 1 - x``), like ``ImageOps.solarize``."""
    inverted = (images >= threshold).to(images.dtype)
    return images.addcmul(inverted, 1.0 - 2.0 * images)


_JITTER_OPERATIONS = {  # operation -> (ViewParameters factor attribute, batched function)
    BRIGHTNESS: ("brightness", _adjust_brightness),
    CONTRAST: ("contrast", _adjust_contrast),
    SATURATION: ("saturation", _adjust_saturation),
    HUE: ("hue", _adjust_hue),
}


def _gaussian_blur(images: Tensor, sigmas: Sequence[float], kernel_size: int) -> Tensor:
    """Separable reflect-padded Gaussian blur with one sigma per view (torchvision ``gaussian_blur``).

    Written as a sum of shifted slices (one fused multiply-add per tap and direction): with a
    different kernel per view this is several times faster on CPU than a grouped convolution.
    """
    radius = min(kernel_size // 2, images.shape[-1] - 1, images.shape[-2] - 1)
    if radius <= 0:
        return images
    taps = 2 * radius + 1
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    sigma = torch.tensor(sigmas, dtype=images.dtype).view(-1, 1)
    kernels = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).view(-1, 1, 1, 1, taps)  # (n, 1, 1, 1, taps)
    height, width = images.shape[-2:]
    padded = torch_functional.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = padded[..., :, 0:width] * kernels[..., 0]
    for tap in range(1, taps):
        rows.addcmul_(padded[..., :, tap : tap + width], kernels[..., tap])
    blurred = rows[..., 0:height, :] * kernels[..., 0]
    for tap in range(1, taps):
        blurred.addcmul_(rows[..., tap : tap + height, :], kernels[..., tap])
    return blurred


# --------------------------------------------------------------------------------------------------
# The augmentation
# --------------------------------------------------------------------------------------------------
class MultiCropRecipe:
    """The DINO multi-crop recipe: view counts, sizes, scales and probabilities, validated.

    Shared by the per-image :class:`MultiCropAugmentation` and the batched
    :class:`dino_hf.data.batched_augmentation.BatchedMultiCropAugmentation`, so that both draw from the same
    distributions. With no arguments, the official ``DataAugmentationDINO``.

    Args:
        global_crop_size: output side of the global crops (official 224).
        local_crop_size: output side of the local crops (official 96).
        num_local_crops: number of local crops (official 8 in ``main_dino.py``, 10 in the README
            recipes; 0 disables multi-crop).
        global_crop_scale: area fraction range of global crops (official (0.4, 1.0); (0.14, 1.0) without
            local crops).
        local_crop_scale: area fraction range of local crops (official (0.05, 0.4)).
        crop_ratio: aspect-ratio range of all crops (torchvision default (3/4, 4/3)).
        flip_probability: horizontal flip probability (0.5).
        color_jitter_probability: probability of applying colour jitter (0.8).
        brightness, contrast, saturation: jitter strengths; factors are U(1 - s, 1 + s) (0.4, 0.4, 0.2).
        hue: hue shift range U(-hue, hue) in turns (0.1).
        grayscale_probability: probability of grayscale conversion (0.2).
        global_blur_probabilities: blur probability of each global crop; its length is the number of
            global crops (official (1.0, 0.1)).
        local_blur_probability: blur probability of each local crop (0.5).
        blur_sigma: range of the blur's standard deviation in output pixels (official (0.1, 2.0)).
        blur_kernel_size: odd kernel size; ``None`` -> ``2 * ceil(3 * blur_sigma[1]) + 1``.
        global_solarize_probabilities: solarisation probability of each global crop (official (0.0, 0.2)).
        local_solarize_probability: solarisation probability of each local crop (0.0).
        solarize_threshold: 8-bit threshold; pixels at or above it are inverted (128, as PIL's default).
        mean, std: normalisation (ImageNet statistics).

    """

    def __init__(
        self,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
        num_local_crops: int = 8,
        global_crop_scale: tuple[float, float] = (0.4, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.4),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_probability: float = 0.5,
        color_jitter_probability: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_probability: float = 0.2,
        global_blur_probabilities: Sequence[float] = (1.0, 0.1),
        local_blur_probability: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        global_solarize_probabilities: Sequence[float] = (0.0, 0.2),
        local_solarize_probability: float = 0.0,
        solarize_threshold: int = 128,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if len(global_blur_probabilities) != len(global_solarize_probabilities):
            raise ValueError(
                "global_blur_probabilities and global_solarize_probabilities need one entry per global crop, "
                f"got {len(global_blur_probabilities)} and {len(global_solarize_probabilities)}."
            )
        if len(global_blur_probabilities) < 1:
            raise ValueError("At least one global crop is needed (global_blur_probabilities is empty).")
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}.")
        for name, value in (("global_crop_scale", global_crop_scale), ("local_crop_scale", local_crop_scale)):
            if not 0 < value[0] <= value[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {value}.")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {blur_sigma}.")
        if hue < 0 or hue > 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}.")
        self.global_crop_size = int(global_crop_size)
        self.local_crop_size = int(local_crop_size)
        self.num_local_crops = int(num_local_crops)
        self.global_crop_scale = tuple(float(v) for v in global_crop_scale)
        self.local_crop_scale = tuple(float(v) for v in local_crop_scale)
        self.crop_ratio = tuple(float(v) for v in crop_ratio)
        self.flip_probability = float(flip_probability)
        self.color_jitter_probability = float(color_jitter_probability)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.grayscale_probability = float(grayscale_probability)
        self.global_blur_probabilities = tuple(float(p) for p in global_blur_probabilities)
        self.local_blur_probability = float(local_blur_probability)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.blur_kernel_size = int(blur_kernel_size or 2 * math.ceil(3 * blur_sigma[1]) + 1)
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}.")
        self.global_solarize_probabilities = tuple(float(p) for p in global_solarize_probabilities)
        self.local_solarize_probability = float(local_solarize_probability)
        self.solarize_threshold = int(solarize_threshold)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def num_global_crops(self) -> int:
        """Number of global crops (the teacher's views), ``len(global_blur_probabilities)``."""
        return len(self.global_blur_probabilities)

    @property
    def num_crops(self) -> int:
        """Total number of views per image."""
        return self.num_global_crops + self.num_local_crops

    @staticmethod
    def field_names() -> list[str]:
        """The recipe's constructor arguments, each stored as an attribute of the same name."""
        return [name for name in inspect.signature(MultiCropRecipe.__init__).parameters if name != "self"]

    @classmethod
    def with_strengths(
        cls, color_jitter_strength: float = 1.0, blur_probability_scale: float = 1.0, **fields: Any
    ) -> MultiCropRecipe:
        """The recipe with its default photometric strengths scaled, plus any other ``fields``.

        The colour-jitter strengths (brightness, contrast, saturation, hue) are the defaults times
        ``color_jitter_strength`` (hue capped at its limit 0.5); the blur probabilities (global and
        local) are the defaults times ``blur_probability_scale``, capped at 1. This is how the
        ``--color_jitter_strength`` and ``--blur_probability_scale`` flags weaken or strengthen the
        official recipe without restating its numbers.
        """
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(MultiCropRecipe.__init__).parameters.items()
            if name != "self"
        }
        scaled = {
            "brightness": defaults["brightness"] * color_jitter_strength,
            "contrast": defaults["contrast"] * color_jitter_strength,
            "saturation": defaults["saturation"] * color_jitter_strength,
            "hue": min(defaults["hue"] * color_jitter_strength, 0.5),
            "global_blur_probabilities": tuple(
                min(1.0, probability * blur_probability_scale) for probability in defaults["global_blur_probabilities"]
            ),
            "local_blur_probability": min(1.0, defaults["local_blur_probability"] * blur_probability_scale),
        }
        return cls(**{**scaled, **fields})

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_"))
        return f"{type(self).__name__}({fields})"


class MultiCropAugmentation(MultiCropRecipe):
    """DINO multi-crop views of one image; with no arguments, the official ``DataAugmentationDINO``.

    Each view: random-resized crop (bicubic, antialiased) -> horizontal flip -> colour jitter
    (brightness, contrast, saturation, hue in random order) with probability
    ``color_jitter_probability`` -> grayscale -> Gaussian blur -> solarisation -> normalisation.
    The official recipe uses blur probability 1.0 on global crop 1, 0.1 on global crop 2 and 0.5 on
    local crops, and solarisation (threshold 128) with probability 0.2 on global crop 2 only.

    Arguments: those of :class:`MultiCropRecipe`.

    Call the instance on one image (PIL image or tensor, see :func:`to_rgb_uint8`) to get its views:
    ``num_global_crops`` float32 tensors ``(3, global_crop_size, global_crop_size)`` followed by
    ``num_local_crops`` tensors ``(3, local_crop_size, local_crop_size)``, normalised.
    """

    # ---- random decisions ------------------------------------------------------------------------
    def sample_parameters(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> list[ViewParameters]:
        """Draw the random decisions of every view of an image of ``height`` x ``width`` pixels.

        All uniforms come from one ``torch.rand`` call on ``generator`` (the global torch generator
        when ``None``), so a seeded generator makes the views reproducible.
        """
        uniforms = torch.rand(self.num_crops, _UNIFORMS_PER_VIEW, generator=generator, dtype=torch.float64)
        views = []
        for index, u in enumerate(uniforms.tolist()):
            is_global = index < self.num_global_crops
            crop = _resized_crop_box(
                height,
                width,
                self.global_crop_scale if is_global else self.local_crop_scale,
                self.crop_ratio,
                u,
            )
            rest = u[4 * _RESIZED_CROP_ATTEMPTS :]
            blur_probability = self.global_blur_probabilities[index] if is_global else self.local_blur_probability
            solarize_probability = (
                self.global_solarize_probabilities[index] if is_global else self.local_solarize_probability
            )
            order = tuple(int(i) for i in np.argsort(rest[9:13], kind="stable"))
            views.append(
                ViewParameters(
                    crop=crop,
                    size=self.global_crop_size if is_global else self.local_crop_size,
                    flip=rest[0] < self.flip_probability,
                    color_jitter=rest[1] < self.color_jitter_probability,
                    jitter_order=order,  # type: ignore[arg-type]
                    brightness=1.0 + self.brightness * (2.0 * rest[2] - 1.0),
                    contrast=1.0 + self.contrast * (2.0 * rest[3] - 1.0),
                    saturation=1.0 + self.saturation * (2.0 * rest[4] - 1.0),
                    hue=self.hue * (2.0 * rest[5] - 1.0),
                    grayscale=rest[6] < self.grayscale_probability,
                    # official GaussianBlur: `random.random() <= p` -> always when p == 1
                    blur_sigma=(
                        self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * rest[8]
                        if rest[7] < blur_probability or blur_probability >= 1.0
                        else None
                    ),
                    solarize=rest[13] < solarize_probability,
                )
            )
        return views

    # ---- pixels ----------------------------------------------------------------------------------
    def apply(self, image: Any, parameters: Sequence[ViewParameters]) -> tuple[Tensor, Tensor | None]:
        """Render the views described by ``parameters`` from ``image``.

        Returns ``(global_views, local_views)``: float32 ``(G, 3, H, W)`` and ``(N, 3, h, w)``
        (``None`` when there are no local crops), normalised.
        """
        image = to_rgb_uint8(image)
        num_global = self.num_global_crops
        global_views = self._render(image, parameters[:num_global])
        local_views = self._render(image, parameters[num_global:]) if len(parameters) > num_global else None
        return global_views, local_views

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> list[Tensor]:
        """Views of ``image``: ``num_global_crops`` global then ``num_local_crops`` local float32 ``(3, s, s)``."""
        global_views, local_views = self.multi_crop(image, generator)
        views = list(global_views.unbind(0))
        if local_views is not None:
            views.extend(local_views.unbind(0))
        return views

    def multi_crop(self, image: Any, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Like ``__call__`` but returns the stacked ``(G, 3, H, W)`` and ``(N, 3, h, w)`` views (or ``None``)."""
        image = to_rgb_uint8(image)
        parameters = self.sample_parameters(image.shape[-2], image.shape[-1], generator)
        return self.apply(image, parameters)

    def _render(self, image: Tensor, parameters: Sequence[ViewParameters]) -> Tensor:
        """Crop, then colour-process the stacked views of one resolution. Returns (n, 3, s, s) float32."""
        crops = [
            F.resized_crop(
                image,
                *view.crop,
                size=[view.size, view.size],
                interpolation=F.InterpolationMode.BICUBIC,
                antialias=True,
            )
            for view in parameters
        ]
        images = torch.stack(crops).to(torch.float32).div_(255.0)

        flipped = [i for i, view in enumerate(parameters) if view.flip]
        if flipped:
            images[flipped] = images[flipped].flip(-1)

        # Colour jitter: each view applies its four operations in its own random order. Slot by slot,
        # the views whose operation in that slot is `operation` are processed together.
        for slot in range(4):
            for operation, (attribute, function) in _JITTER_OPERATIONS.items():
                selected = [
                    i for i, view in enumerate(parameters) if view.color_jitter and view.jitter_order[slot] == operation
                ]
                if selected:
                    factors = _per_view([getattr(parameters[i], attribute) for i in selected], images)
                    images = self._apply_to(images, selected, lambda x, f=function, v=factors: f(x, v))

        grayscale = [i for i, view in enumerate(parameters) if view.grayscale]
        if grayscale:
            images = self._apply_to(images, grayscale, lambda x: _grayscale(x).expand(-1, 3, -1, -1))

        blurred = [i for i, view in enumerate(parameters) if view.blur_sigma is not None]
        if blurred:
            sigmas = [parameters[i].blur_sigma for i in blurred]
            images = self._apply_to(images, blurred, lambda x: _gaussian_blur(x, sigmas, self.blur_kernel_size))

        solarized = [i for i, view in enumerate(parameters) if view.solarize]
        if solarized:
            threshold = self.solarize_threshold / 255.0
            images = self._apply_to(images, solarized, lambda x: _solarize(x, threshold))

        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, 3, 1, 1)
        inverse_std = 1.0 / torch.tensor(self.std, dtype=images.dtype).view(1, 3, 1, 1)
        return images.sub_(mean).mul_(inverse_std)

    @staticmethod
    def _apply_to(images: Tensor, selected: list[int], function) -> Tensor:
        """Apply ``function`` to the views ``selected`` (all of them without copying when possible)."""
        if len(selected) == images.shape[0]:
            return function(images).contiguous()
        index = torch.tensor(selected)
        images.index_copy_(0, index, function(images.index_select(0, index)))
        return images
