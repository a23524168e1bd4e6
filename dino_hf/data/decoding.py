"""The one image decoder: any image value a dataset, a user or a test hands over -> RGB uint8 tensor.

Every path into the library goes through here: the training loader (:func:`decode_image` on the
undecoded ``datasets.Image`` cells, bad images raising :class:`BadImageError`), the per-image
augmentation (:func:`to_rgb_uint8` on PIL images, arrays and tensors) and evaluation (decoded images
handed to an image processor as PIL images, :func:`to_pil_image`). One decoder means one answer to
"what does a 16-bit PNG, a CMYK JPEG or a palette GIF become", wherever the image enters.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["BadImageError", "decode_image", "to_pil_image", "to_rgb_uint8"]


class BadImageError(ValueError):
    """An example whose image cannot be used (missing, undecodable, truncated, too small)."""


def decode_image(value: Any, min_image_size: int = 2) -> Tensor:
    """Decode one image-column value to an RGB ``(3, H, W)`` uint8 tensor.

    ``value`` may be an undecoded ``datasets.Image`` dict (``{"bytes", "path"}``), raw bytes, a path,
    a PIL image, an array or a tensor. Raises :class:`BadImageError` for a missing value, bytes that do
    not decode (including truncated and zero-byte files) and images smaller than ``min_image_size``
    pixels on a side.
    """
    if value is None:
        raise BadImageError("missing image value")
    try:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and path is None:
                raise BadImageError("missing image value")
            image = _open_path(path) if data is None else _open_bytes(data)
        elif isinstance(value, (bytes, bytearray)):
            image = _open_bytes(value)
        elif isinstance(value, str):
            image = _open_path(value)
        else:
            image = value
        pixels = to_rgb_uint8(image)
    except BadImageError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadImageError(f"{type(error).__name__}: {error}") from error
    if min(pixels.shape[-2:]) < min_image_size:
        raise BadImageError(f"image of {pixels.shape[-1]}x{pixels.shape[-2]} pixels is smaller than {min_image_size}")
    return pixels


def to_pil_image(pixels: Tensor) -> Image.Image:
    """An RGB ``(3, H, W)`` uint8 tensor (as :func:`decode_image` returns) as an RGB PIL image."""
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def _open_bytes(data: bytes | bytearray) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so that truncated files fail here and not later in a worker
    return image


def _open_path(path: str) -> Image.Image:
    # datasets' decoder also opens remote paths (hf://, https://) through fsspec; imported here
    # because a loader worker decoding bytes never needs it.
    import datasets

    return datasets.Image().decode_example({"bytes": None, "path": path})


def to_rgb_uint8(image: Any) -> Tensor:
    """Convert an image to an RGB ``(3, H, W)`` uint8 tensor (channels-last memory, ready to crop).

    Accepts a PIL image of any mode (``RGB``, ``L``, ``LA``, ``P``/``PA`` palette, ``RGBA``, ``CMYK``,
    ``YCbCr``, ``1``, 16-bit ``I;16*``, 32-bit ``I``, float ``F``), a torch tensor ``(H, W)``,
    ``(1|3|4, H, W)`` of dtype uint8, uint16 (scaled by 1/257) or float (``[0, 1]``), or a numpy array
    ``(H, W)`` / ``(H, W, 1|3|4)``. Grayscale is replicated to three channels and alpha is dropped,
    as the official loader's ``Image.convert("RGB")`` does.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb_uint8(image)
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 2 else image.transpose(2, 0, 1)
        return _tensor_to_rgb_uint8(torch.from_numpy(np.ascontiguousarray(array)))
    if isinstance(image, Tensor):
        return _tensor_to_rgb_uint8(image)
    raise TypeError(f"Expected a PIL image, a torch tensor or a numpy array, got {type(image).__name__}.")


def _pil_to_rgb_uint8(image: Image.Image) -> Tensor:
    mode = image.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
        array = np.asarray(image)
        if mode == "F":
            scale = 255.0 if float(array.max(initial=0.0)) <= 1.0 else 1.0
            gray = np.clip(np.rint(array * scale), 0, 255)
        elif mode.startswith("I;16") or int(array.max(initial=0)) > 255:
            gray = np.clip(array.astype(np.float32) / 257.0 + 0.5, 0, 255)  # 16-bit range -> 8 bits
        else:
            gray = np.clip(array, 0, 255)
        array = np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    else:
        if mode != "RGB":
            image = image.convert("RGB")
        array = np.array(image, dtype=np.uint8, copy=True)  # writable copy for torch.from_numpy
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W) view of HWC memory: channels-last


def _tensor_to_rgb_uint8(image: Tensor) -> Tensor:
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise ValueError(f"Expected an image tensor of shape (C, H, W) or (H, W), got {tuple(image.shape)}.")
    if image.shape[0] not in (1, 2, 3, 4) and image.shape[-1] in (1, 3, 4):
        image = image.permute(2, 0, 1)  # (H, W, C) given
    if image.dtype == torch.uint16:
        image = ((image.to(torch.int32) + 128) // 257).to(torch.uint8)
    elif image.dtype.is_floating_point:
        image = (image.clamp(0, 1) * 255).round_().to(torch.uint8)
    elif image.dtype != torch.uint8:
        image = image.clamp(0, 255).to(torch.uint8)
    channels = image.shape[0]
    if channels in (1, 2):  # gray or gray + alpha
        image = image[:1].expand(3, -1, -1)
    elif channels == 4:  # RGBA: drop alpha like Image.convert("RGB")
        image = image[:3]
    elif channels != 3:
        raise ValueError(f"Expected 1, 2, 3 or 4 channels, got {channels}.")
    if not image.permute(1, 2, 0).is_contiguous():
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # channels-last for fast cropping
    return image
