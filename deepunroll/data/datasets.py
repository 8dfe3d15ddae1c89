"""torch Datasets over deepunroll HDF5 files."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class InverseProblemDataset(Dataset):
    """In-memory samples {"x": (*in_shape), "y": (*out_shape), "x0": (*in_shape), "index": int}."""

    def __init__(self, fields: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        self.x, self.y, self.x0 = (fields[k].to(dtype) for k in ("x", "y", "x0"))

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.y[index], "x0": self.x0[index], "index": index}
