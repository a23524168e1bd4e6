"""Block masks of the iBOT masked-patch objective, drawn as DINOv2 draws them.

- :class:`MaskingGenerator`: one ``(H, W)`` patch-grid mask made of random rectangles (BEiT-style
  block masking: each block's area is uniform in ``[min_num_patches, max_num_patches]``, its aspect
  ratio log-uniform in ``[min_aspect, 1 / min_aspect]``), with at most the requested number of patches;
- :func:`sample_masks`: the masks of a batch of global crops (DINOv2's ``collate_data_and_cast``): a
  fraction ``mask_sample_probability`` of the crops is masked, with mask ratios stratified over
  ``mask_ratio_min_max`` (one ratio per equal-width bin), the rest unmasked, in random order;
- :class:`MaskSampler`: adds such masks to every training batch, from a random generator of its own
  whose state is part of the checkpoint (a resumed run draws the masks an uninterrupted one would).

The randomness comes from a ``numpy.random.Generator`` (DINOv2 uses Python's global ``random``): the
masks neither depend on nor disturb the model's random streams (drop path) or the crops'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["MaskSampler", "MaskingGenerator", "sample_masks"]

#: DINOv2's defaults (``dinov2/train/train.py``, ``ssl_default_config.yaml``).
DEFAULT_MASK_RATIO_MIN_MAX = (0.1, 0.5)
DEFAULT_MASK_SAMPLE_PROBABILITY = 0.5


def _uniform(generator: np.random.Generator, low: float, high: float) -> float:
    """``low + (high - low) * U[0, 1)``, as Python's ``random.uniform`` (DINOv2's), also for ``high < low``
    (a block allowed fewer patches than ``min_num_patches``), which numpy's ``uniform`` refuses."""
    return low + (high - low) * generator.random()


class MaskingGenerator:
    """Draws one block mask over a patch grid (DINOv2's ``MaskingGenerator``, vectorised).

    Args:
        input_size: the patch grid, ``(height, width)`` in patches, or one side of a square grid.
        min_num_patches: smallest block area (4 in DINOv2).
        max_num_patches: largest block area; DINOv2 trains with half the grid (the default).
        min_aspect: smallest block aspect ratio (height / width); the largest is ``max_aspect``
            (default ``1 / min_aspect``). DINOv2: 0.3.
        max_aspect: see ``min_aspect``.

    Example::

        generator = MaskingGenerator((16, 16))
        mask = generator(64, np.random.default_rng(0))  # (16, 16) bool, at most 64 patches set
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height < 1 or width < 1:
            raise ValueError(f"input_size must be positive, got {(height, width)}.")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect <= 0):
            raise ValueError(f"min_aspect and max_aspect must be positive, got {min_aspect}, {max_aspect}.")
        self.height, self.width = int(height), int(width)
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator(input_size=({self.height}, {self.width}), min_num_patches={self.min_num_patches}, "
                f"max_num_patches={self.max_num_patches}, aspect=exp({self.log_aspect_ratio}))")

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, generator: np.random.Generator) -> int:
        """Mask one more rectangle (up to 10 tries) that adds at most ``max_mask_patches`` patches.

        Returns:
            The number of patches newly masked (0 when every try failed).
        """
        for _ in range(10):
            target_area = _uniform(generator, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(_uniform(generator, *self.log_aspect_ratio))
            height = int(round(math.sqrt(target_area * aspect_ratio)))
            width = int(round(math.sqrt(target_area / aspect_ratio)))
            if width < self.width and height < self.height:
                top = int(generator.integers(0, self.height - height + 1))
                left = int(generator.integers(0, self.width - width + 1))
                block = mask[top : top + height, left : left + width]
                new_patches = height * width - int(block.sum())
                # the block must add something, and not more than allowed (overlaps count once)
                if 0 < new_patches <= max_mask_patches:
                    block[...] = True
                    return new_patches
        return 0

    def __call__(self, num_masking_patches: int, generator: np.random.Generator) -> np.ndarray:
        """A ``(height, width)`` bool mask of at most ``num_masking_patches`` patches (fewer when the
        blocks stop fitting; 0 gives an empty mask)."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_mask_patches, generator)
            if added == 0:
                break
            count += added
        return mask


def sample_masks(
    masking_generator: MaskingGenerator,
    num_images: int,
    generator: np.random.Generator,
    mask_ratio_min_max: Sequence[float] = DEFAULT_MASK_RATIO_MIN_MAX,
    mask_sample_probability: float = DEFAULT_MASK_SAMPLE_PROBABILITY,
) -> Tensor:
    """Masks for ``num_images`` crops, drawn as DINOv2's ``collate_data_and_cast`` draws them.

    ``int(num_images * mask_sample_probability)`` crops are masked; their target ratios split
    ``mask_ratio_min_max`` into that many equal bins (crop ``i`` draws its ratio uniformly in bin ``i``,
    so a batch always covers the whole range) and each asks for ``int(num_patches * ratio)`` patches.
    The other crops stay unmasked; the order is then shuffled.

    Returns:
        ``(num_images, height, width)`` bool tensor.
    """
    low, high = mask_ratio_min_max
    num_masked = int(num_images * mask_sample_probability)
    bounds = np.linspace(low, high, num_masked + 1)
    masks = [
        masking_generator(int(masking_generator.num_patches * _uniform(generator, bounds[i], bounds[i + 1])), generator)
        for i in range(num_masked)
    ]
    empty = np.zeros((masking_generator.height, masking_generator.width), dtype=bool)
    masks.extend(empty for _ in range(num_images - num_masked))
    order = generator.permutation(num_images)
    return torch.from_numpy(np.stack([masks[index] for index in order]))


class MaskSampler:
    """Adds ``"masks"`` ``(G, B, h, w)`` bool to each batch of ``G`` global crops of ``B`` images.

    The ``G * B`` global crops of a batch are masked together (:func:`sample_masks`, crop-major, the
    order of ``global_crops.flatten(0, 1)``), as DINOv2 masks its collated global crops.

    Args:
        grid_size: patches per side of a global crop, ``(h, w)``.
        mask_ratio_min_max: range of the mask ratio of a masked crop.
        mask_sample_probability: fraction of the global crops that are masked.
        seed: seed of this sampler's own generator (mix in the process index).
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        mask_ratio_min_max: Sequence[float] = DEFAULT_MASK_RATIO_MIN_MAX,
        mask_sample_probability: float = DEFAULT_MASK_SAMPLE_PROBABILITY,
        seed: int = 0,
    ) -> None:
        low, high = (float(value) for value in mask_ratio_min_max)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {[low, high]}.")
        if not 0.0 <= mask_sample_probability <= 1.0:
            raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}.")
        self.masking_generator = MaskingGenerator(grid_size)
        self.mask_ratio_min_max = (low, high)
        self.mask_sample_probability = float(mask_sample_probability)
        self.generator = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        num_global_crops, batch_size = batch["global_crops"].shape[:2]
        masks = sample_masks(self.masking_generator, num_global_crops * batch_size, self.generator,
                             self.mask_ratio_min_max, self.mask_sample_probability)
        return {**batch, "masks": masks.view(num_global_crops, batch_size, *masks.shape[1:])}

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (plain ints and strings: it loads with ``torch.load(weights_only=True)``)
        and the settings it belongs to."""
        return {
            "generator": self.generator.bit_generator.state,
            "grid_size": [self.masking_generator.height, self.masking_generator.width],
            "mask_ratio_min_max": list(self.mask_ratio_min_max),
            "mask_sample_probability": self.mask_sample_probability,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state drawn with other settings is refused."""
        saved = (list(state["grid_size"]), list(state["mask_ratio_min_max"]), state["mask_sample_probability"])
        current = ([self.masking_generator.height, self.masking_generator.width], list(self.mask_ratio_min_max),
                   self.mask_sample_probability)
        if saved != current:
            raise ValueError(
                f"The checkpoint's masks were drawn on a {saved[0]} patch grid with --mask_ratio_min_max {saved[1]} and "
                f"--mask_sample_probability {saved[2]}; this run has {current[0]}, {current[1]} and {current[2]}: "
                "resume with the settings it was trained with."
            )
        self.generator.bit_generator.state = state["generator"]
