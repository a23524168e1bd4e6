"""dino_hf.data.masking against DINOv2's masking code, written out below as DINOv2 has it (pixel loops,
``random.uniform`` / ``random.randint`` semantics), driven by the same random numbers; then the
ratio distribution and block shapes the masks must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_hf import MaskingGenerator
from dino_hf.data.masking import MaskSampler, sample_masks


class ReferenceRandom:
    """Python's ``random.uniform`` / ``randint`` / ``shuffle`` on a numpy generator, as dino_hf draws them."""

    def __init__(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.generator.random()

    def randint(self, low: int, high: int) -> int:  # both ends included
        return int(self.generator.integers(low, high + 1))


def reference_mask(height, width, num_masking_patches, rng, min_num_patches=4, max_num_patches=None, min_aspect=0.3):
    """dinov2/data/masking.py ``MaskingGenerator.__call__`` with its ``_mask``, loop for loop."""
    max_num_patches = 0.5 * height * width if max_num_patches is None else max_num_patches
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)

    def add_block(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
        delta = add_block(max_mask_patches)
        if delta == 0:
            break
        mask_count += delta
    return mask


def reference_collate_masks(num_images, height, width, ratio_min_max, probability, rng):
    """dinov2/data/collate.py ``collate_data_and_cast``: stratified ratios, then shuffled."""
    num_tokens = height * width
    num_masked = int(num_images * probability)
    probs = np.linspace(*ratio_min_max, num_masked + 1)
    masks = [reference_mask(height, width, int(num_tokens * rng.uniform(probs[i], probs[i + 1])), rng)
             for i in range(num_masked)]
    masks += [reference_mask(height, width, 0, rng) for _ in range(num_masked, num_images)]
    order = rng.generator.permutation(num_images)  # DINOv2: random.shuffle
    return np.stack([masks[i] for i in order])


@pytest.mark.parametrize("grid", [(4, 4), (7, 9), (16, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_single_masks_equal_the_dinov2_loops(grid, seed):
    generator = MaskingGenerator(grid)
    ours, reference = np.random.default_rng(seed), ReferenceRandom(seed)
    for num_patches in [0, 1, 3, grid[0] * grid[1] // 4, grid[0] * grid[1] // 2, grid[0] * grid[1]]:
        for _ in range(5):
            expected = reference_mask(*grid, num_patches, reference)
            np.testing.assert_array_equal(generator(num_patches, ours), expected)


@pytest.mark.parametrize("num_images,ratio_min_max,probability", [
    (8, (0.1, 0.5), 0.5), (13, (0.0, 1.0), 1.0), (6, (0.3, 0.3), 0.5), (5, (0.1, 0.5), 0.0),
])
def test_batch_masks_equal_the_dinov2_collate(num_images, ratio_min_max, probability):
    grid = (14, 14)
    ours = sample_masks(MaskingGenerator(grid), num_images, np.random.default_rng(3), ratio_min_max, probability)
    expected = reference_collate_masks(num_images, *grid, ratio_min_max, probability, ReferenceRandom(3))
    assert ours.dtype == torch.bool and ours.shape == (num_images, *grid)
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_ratio_distribution_is_stratified_over_the_range():
    """A batch masks int(N * p) crops, one per equal-width ratio bin, never more than asked for."""
    grid, num_images, low, high = (16, 16), 64, 0.1, 0.5
    generator = np.random.default_rng(0)
    achieved = []
    for _ in range(20):
        masks = sample_masks(MaskingGenerator(grid), num_images, generator, (low, high), 0.5)
        ratios = masks.flatten(1).float().mean(dim=1)
        masked = ratios[ratios > 0].sort().values
        assert len(masked) == num_images // 2  # 16x16 grids always fit at least one block
        bounds = torch.linspace(low, high, len(masked) + 1)
        # the i-th smallest ratio reaches at most the top of bin i (a mask never exceeds its target)
        assert bool((masked <= bounds[1:] + 1e-6).all())
        achieved.append(masked)
    achieved = torch.stack(achieved)  # (20 batches, 32 masked crops), sorted per batch
    # the blocks come close to their targets: on average within 10% of the bin centres
    centres = (torch.linspace(low, high, 33)[:-1] + torch.linspace(low, high, 33)[1:]) / 2
    assert float((achieved.mean(dim=0) / centres).mean()) > 0.9
    assert float(achieved.max()) <= high and float(achieved.min()) >= 0.05


def test_blocks_are_rectangles_with_dinov2_areas_and_aspects():
    """One block on an empty grid: a rectangle narrower and lower than the grid, at least
    min_num_patches (up to rounding), and both tall and wide ones within the aspect range."""
    height, width = 16, 16
    generator = MaskingGenerator((height, width), max_num_patches=64)
    rng = np.random.default_rng(0)
    aspects = []
    for _ in range(300):
        mask = np.zeros((height, width), dtype=bool)
        added = generator._add_block(mask, 64, rng)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert added == h * w == mask.sum()  # one full rectangle
        assert h < height and w < width and 2 <= h * w <= 64
        # rounding of h = round(sqrt(a * r)), w = round(sqrt(a / r)) with r in [0.3, 1 / 0.3]
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
        aspects.append(h / w)
    assert min(aspects) < 0.6 and max(aspects) > 1.6  # wide and tall blocks both occur


def test_mask_sampler_adds_crop_major_masks_and_resumes_exactly(tmp_path):
    batch = {"global_crops": torch.zeros(2, 5, 3, 28, 28)}
    sampler = MaskSampler((4, 4), (0.1, 0.5), 0.5, seed=7)
    first = sampler(batch)["masks"]
    assert first.shape == (2, 5, 4, 4) and first.dtype == torch.bool
    assert int((first.flatten(2).sum(-1) > 0).sum()) <= 5  # int(10 * 0.5) crops of the 10 can be masked
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    expected = [sampler(batch)["masks"] for _ in range(3)]

    resumed = MaskSampler((4, 4), (0.1, 0.5), 0.5, seed=123)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for masks in expected:
        assert torch.equal(resumed(batch)["masks"], masks)

    other = MaskSampler((4, 4), (0.2, 0.5), 0.5)
    with pytest.raises(ValueError, match="--mask_ratio_min_max"):
        other.load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("ratios,probability", [((0.6, 0.4), 0.5), ((-0.1, 0.5), 0.5), ((0.1, 1.2), 0.5),
                                                ((0.1, 0.5), 1.5)])
def test_mask_sampler_refuses_impossible_settings(ratios, probability):
    with pytest.raises(ValueError):
        MaskSampler((4, 4), ratios, probability)
