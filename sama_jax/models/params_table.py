"""The one format of a model's checkpoint name table (the models' *_params.py files use it).

A table is a list of Param rows: our parameter path (dotted, as nnx.to_flat_state names it), the
checkpoint's key (a "{i}" in it: one key per layer, stacked on axis 0 of ours), and how the tensor
becomes ours. The released layout's names are the table's; another layout (diffusers,
transformers) is a renaming of them, kept beside the table.

    Param("blocks.ffn.fc1.kernel", "blocks.{i}.ffn.0.weight", "linear")
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# torch -> ours: Linear (out, in) -> (in, out); Conv3d (out, in, t, h, w) -> (t, h, w, in, out);
# Conv2d (out, in, h, w) -> (h, w, in, out). "conv1x1": a 1x1 Conv2d used as a Linear, (out, in, 1, 1)
# -> (in, out); "flatten": a broadcastable gain (C, 1, 1[, 1]) -> (C,).
PERMUTATION = {"linear": (1, 0), "conv": (2, 3, 4, 1, 0), "conv2d": (2, 3, 1, 0)}
TRANSFORMS = ("copy", "conv1x1", "flatten", *PERMUTATION)


class Param(NamedTuple):
    ours: str
    key: str
    how: str = "copy"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def keys(self, num_layers: int) -> list[str]:
        return [self.key.format(i=i) for i in range(num_layers)] if self.stacked else [self.key]


def transform(array: np.ndarray, how: str) -> np.ndarray:
    if how == "conv1x1":
        return array[:, :, 0, 0].T
    if how == "flatten":
        return array.reshape(-1)
    return array.transpose(PERMUTATION[how]) if how in PERMUTATION else array


def to_released(array: np.ndarray, how: str) -> np.ndarray:
    """ours -> the checkpoint's layout: the inverse of transform (a flattened gain's torch shape is
    not known here)."""
    if how == "conv1x1":
        return array.T[:, :, None, None]
    if how == "flatten":
        raise ValueError("a 'flatten' row's released shape is not recorded: it has no inverse here")
    return array.transpose(np.argsort(PERMUTATION[how])) if how in PERMUTATION else array


def stored_shape(torch_shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    if how == "conv1x1":
        return (torch_shape[1], torch_shape[0])
    if how == "flatten":
        return (int(np.prod(torch_shape)),)
    return tuple(torch_shape[i] for i in PERMUTATION[how]) if how in PERMUTATION else tuple(torch_shape)


def tree(items) -> dict:
    """[(ours 'a.b.c', value), ...] -> the nested dict {"a": {"b": {"c": value}}} (a ParamsWriter group)."""
    out: dict = {}
    for ours, value in items:
        *parents, leaf = ours.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def linear(ours: str, key: str, bias: bool = True) -> list[Param]:
    """A torch Linear: weight (out, in) -> kernel (in, out), and its bias."""
    rows = [Param(f"{ours}.kernel", f"{key}.weight", "linear")]
    return rows + ([Param(f"{ours}.bias", f"{key}.bias")] if bias else [])


def norm(ours: str, key: str, bias: bool = True) -> list[Param]:
    rows = [Param(f"{ours}.scale", f"{key}.weight")]
    return rows + ([Param(f"{ours}.bias", f"{key}.bias")] if bias else [])
