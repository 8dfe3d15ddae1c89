"""Grayscale image patches from the images bundled with scikit-image, split by source image.

x (n, P, P) in [0, 1]; train / val / test patches come from disjoint sets of source images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import skimage.data
import torch
from skimage.color import rgb2gray, rgba2rgb

#: skimage.data images shipped inside the scikit-image package (no download), name -> canonical name.
BUNDLED_IMAGES = {
    name: name
    for name in (
        "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
        "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon",
        "page", "retina", "rocket", "text", "checkerboard", "shepp_logan_phantom",
    )
} | {"cat": "chelsea"}

TRAIN_IMAGES = (
    "astronaut", "brick", "cell", "chelsea", "coffee", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
)
VAL_IMAGES = ("clock", "coins")
TEST_IMAGES = ("camera", "moon")
SPLITS = ("train", "val", "test")


def load_gray(name: str) -> np.ndarray:
    """skimage.data image ``name`` as float64 grayscale, min-max scaled to [0, 1]: (H, W)."""
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 3 and image.shape[-1] == 4:
        image = rgba2rgb(image)
    if image.ndim == 3:
        image = rgb2gray(image)
    image = image.astype(np.float64)
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


class ImagePatches:
    """Patch source for the 2D blur problem: P x P grayscale patches in [0, 1], shape (n, P, P).

    Parameters (``data.*`` config fields):
        patch_size: P; must equal the operator's image size.
        stride: None = patches at uniformly random positions (each position of each of the split's
            images equally likely); an int = only from the grid with that step, drawn without replacement.
        train_images, val_images, test_images: skimage.data names; a name may appear in one split only.
    Images are loaded lazily, once per split.
    """

    def __init__(
        self,
        patch_size: int = 64,
        stride: int | None = None,
        train_images: Sequence[str] = TRAIN_IMAGES,
        val_images: Sequence[str] = VAL_IMAGES,
        test_images: Sequence[str] = TEST_IMAGES,
    ) -> None:
        if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1:
            raise ValueError(f"data.patch_size={patch_size!r} must be a positive integer")
        if stride is not None and (isinstance(stride, bool) or int(stride) != stride or stride < 1):
            raise ValueError(f"data.stride={stride!r} must be null (random positions) or a positive integer")
        self.patch_size = int(patch_size)
        self.stride = None if stride is None else int(stride)
        names_per_split = (train_images, val_images, test_images)
        self.images = {split: [str(name) for name in names] for split, names in zip(SPLITS, names_per_split)}
        seen: dict[str, str] = {}
        for split, names in self.images.items():
            if not names:
                raise ValueError(f"data.{split}_images is empty; give at least one skimage.data image")
            for name in names:
                if name not in BUNDLED_IMAGES:
                    raise ValueError(
                        f"data.{split}_images contains {name!r}, not an image bundled with scikit-image; "
                        f"choose from {', '.join(sorted(BUNDLED_IMAGES))}"
                    )
                canonical = BUNDLED_IMAGES[name]
                if canonical in seen:
                    raise ValueError(
                        f"image {name!r} is in both data.{seen[canonical]}_images and data.{split}_images; "
                        "splits must use different source images"
                    )
                seen[canonical] = split
        self._loaded: dict[str, list[np.ndarray]] = {}

    # --------------------------------------------------------------- protocol
    def sample(self, operator, n: int, generator: torch.Generator, split: str) -> torch.Tensor:
        """n patches of ``split``'s images, drawn with ``generator``: (n, P, P) float64 in [0, 1]."""
        return self.draw(operator, n, generator, split)[0]

    def metadata(self) -> dict:
        """Patch size, stride (-1 = random positions), image names per split, scaling."""
        return {
            "generator": type(self).__name__,
            "patch_size": self.patch_size,
            "stride": -1 if self.stride is None else self.stride,
            "train_images": list(self.images["train"]),
            "val_images": list(self.images["val"]),
            "test_images": list(self.images["test"]),
            "scaling": "grayscale, min-max per source image to [0, 1]",
        }

    # -------------------------------------------------------------- internals
    def split_images(self, split: str) -> list[np.ndarray]:
        """The split's source images, grayscale (H, W) float64 in [0, 1] (loaded once)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(map(repr, SPLITS))}")
        if split not in self._loaded:
            images = [load_gray(name) for name in self.images[split]]
            for name, image in zip(self.images[split], images):
                if min(image.shape) < self.patch_size:
                    raise ValueError(
                        f"data.{split}_images: {name!r} is {image.shape[0]}x{image.shape[1]}, "
                        f"smaller than data.patch_size={self.patch_size}"
                    )
            self._loaded[split] = images
        return self._loaded[split]

    def draw(self, operator, n: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches (n, P, P) and their origins (n, 3) = (image index in the split, top row, left column)."""
        size = self.patch_size
        if operator is not None and tuple(operator.in_shape) != (size, size):
            raise ValueError(
                f"data.patch_size={size} does not match the operator's image shape {tuple(operator.in_shape)}"
            )
        images = self.split_images(split)
        step = 1 if self.stride is None else self.stride
        grid = torch.tensor([[(h - size) // step + 1, (w - size) // step + 1] for h, w in (im.shape for im in images)])
        counts = (grid[:, 0] * grid[:, 1]).tolist()  # positions per image
        if self.stride is None:
            flat = torch.randint(sum(counts), (n,), generator=generator)
        else:
            if n > sum(counts):
                raise ValueError(
                    f"{n} {split} patches requested, but data.stride={self.stride} gives only {sum(counts)} "
                    f"patches of size {size} in data.{split}_images; use data.stride=null for random positions"
                )
            flat = torch.randperm(sum(counts), generator=generator)[:n]
        starts = torch.cumsum(torch.tensor([0, *counts]), 0)
        image_index = torch.searchsorted(starts, flat, right=True) - 1
        local = flat - starts[image_index]
        n_cols = grid[image_index, 1]
        top, left = (local // n_cols) * step, (local % n_cols) * step
        origins = torch.stack([image_index, top, left], 1)
        patches = np.zeros((n, size, size))
        for row, (index, top, left) in enumerate(origins.tolist()):  # copies n crops, no per-pixel work
            patches[row] = images[index][top : top + size, left : left + size]
        return torch.from_numpy(patches), origins
