"""Tensor-by-tensor reading of PyTorch checkpoints, and key checks with clear errors.

Formats: one `.safetensors` file; sharded safetensors (a `.safetensors.index.json`, or a directory
holding one or several `.safetensors` files); a PyTorch pickle (`.pth`, `.pt`, `.bin`) read with
torch.load(mmap=True, weights_only=True). Safetensors are memory-mapped, so reading one tensor
touches only that tensor's bytes. This is the only place torch is imported.

Every read checks the tensor: an integer or bool tensor is an error (no parameter of these models
holds one), NaN or Inf values are a one-line warning naming the tensor.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import sys
import zipfile
from typing import Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
    """A checkpoint that does not match what the converter expects; the message says what and where."""


class TensorSource:
    """Read-only view of a checkpoint's tensors: keys, shapes and float32/other numpy arrays."""

    def __init__(self, path: str):
        self.path = path
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        self._pickled: Mapping[str, object] | None = None
        self._mmapped = False
        if not os.path.exists(path):
            raise ConversionError(f"checkpoint not found: {path}")
        files = self._safetensors_files(path)
        if files:
            self._open_safetensors(files)
        elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
            self._open_pickle(path)
        else:
            raise ConversionError(
                f"{path}: not a .safetensors file, a .safetensors.index.json, a directory of "
                ".safetensors files or a .pth/.pt/.bin PyTorch checkpoint"
            )

    @staticmethod
    def _safetensors_files(path: str) -> list[str]:
        if os.path.isdir(path):
            index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
            if index:
                path = index[0]
            else:
                return sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if path.endswith(".safetensors.index.json"):
            with open(path) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConversionError(f"{path}: not a safetensors index ({e})") from e
            base = os.path.dirname(path)
            files = sorted({os.path.join(base, name) for name in weight_map.values()})
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise ConversionError(f"{path}: shards listed in the index are missing: {missing}")
            return files
        return [path] if path.endswith(".safetensors") else []

    def _open_safetensors(self, files: list[str]) -> None:
        from safetensors import safe_open

        for file in files:
            try:
                handle = safe_open(file, framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ConversionError(f"{file}: cannot read safetensors header: {e}") from e
            self._handles[file] = handle
            for key in handle.keys():
                if key in self._file_of:
                    raise ConversionError(f"tensor {key!r} appears in both {self._file_of[key]} and {file}")
                self._file_of[key] = file
                view = handle.get_slice(key)
                self._shapes[key] = tuple(view.get_shape())
                self._dtypes[key] = str(view.get_dtype())

    def _open_pickle(self, path: str) -> None:

        not_a_checkpoint = f"{path} is not a PyTorch checkpoint (zip or legacy pickle format)"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    raise ConversionError(f"{not_a_checkpoint}: a zip archive without data.pkl")
            self._mmapped = True
        else:
            with open(path, "rb") as f:
                if f.read(1) != b"\x80":  # a pickle (protocol >= 2) starts with the PROTO opcode
                    raise ConversionError(not_a_checkpoint)
        try:
            # torch.save's zip format is memory-mapped; the legacy pickle format is read whole.
            state = self._load_pickle()
        except ConversionError:
            raise
        except pickle.UnpicklingError as e:
            raise ConversionError(f"{path}: refused: {_refusal(e)}") from e
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self._mmapped:
                raise ConversionError(f"{path}: cannot load PyTorch checkpoint: {reason}") from e
            raise ConversionError(f"{not_a_checkpoint}: {reason}") from e
        self._pickled = state
        for key, value in state.items():
            if hasattr(value, "shape"):
                self._file_of[key] = path
                self._shapes[key] = tuple(value.shape)
                self._dtypes[key] = str(value.dtype).removeprefix("torch.")

    def _load_pickle(self) -> Mapping[str, object]:
        import torch

        state = torch.load(self.path, map_location="cpu", mmap=self._mmapped, weights_only=True)
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
        if not isinstance(state, Mapping):
            raise ConversionError(f"{self.path}: expected a state dict, found {type(state).__name__}")
        return state

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def file_of(self, key: str) -> str:
        return self._file_of[key]

    def dtype(self, key: str) -> str:
        """The stored dtype's name as the format spells it (BF16, F32, I64 / bfloat16, int64...)."""
        return self._dtypes[key]

    def check_float(self, keys: Iterable[str]) -> None:
        """One error listing every tensor of `keys` that holds integers or bools (read up front:
        the model's parameters are all floating point)."""
        bad = sorted(
            f"{key} ({self._dtypes[key]})"
            for key in keys
            if key in self._dtypes and not _is_float_name(self._dtypes[key])
        )
        if bad:
            shown = bad[:20] + ([f"... and {len(bad) - 20} more"] if len(bad) > 20 else [])
            raise ConversionError(
                f"{self.path}: {len(bad)} tensor(s) hold integers or bools where the "
                "model has float parameters:\n    " + "\n    ".join(shown)
            )

    def _tensor(self, key: str, fresh: bool):
        """The torch tensor of `key`, memory-mapped where the format allows. `fresh`: from a new
        handle, so that dropping the tensor unmaps the pages it touched."""
        if key not in self._file_of:
            raise ConversionError(f"{self.path}: no tensor {key!r}")
        if self._pickled is not None:
            state = self._load_pickle() if fresh and self._mmapped else self._pickled
            return state[key]
        if fresh:
            from safetensors import safe_open

            return safe_open(self._file_of[key], framework="pt").get_tensor(key)
        return self._handles[self._file_of[key]].get_tensor(key)

    def _checked(self, key: str, tensor, where: str = ""):
        if not tensor.is_floating_point():
            raise ConversionError(
                f"{self.path}: tensor {key!r} holds {tensor.dtype}, where the model has a float parameter"
            )
        if tensor.numel():
            import torch

            low, high = torch.aminmax(tensor)  # NaN propagates; one pass over the data
            if not (torch.isfinite(low) and torch.isfinite(high)):
                bad = int((~torch.isfinite(tensor)).sum())
                print(
                    f"convert-wan-weights: warning: {self.file_of(key)}: tensor {key!r}{where} has "
                    f"{bad} NaN/Inf value(s) of {tensor.numel()}",
                    file=sys.stderr,
                )
        return tensor

    def get(self, key: str, dtype=np.float32) -> np.ndarray:
        """One tensor as a numpy array of `dtype` (float32 by default; bf16 is upcast exactly)."""
        import torch

        tensor = self._checked(key, self._tensor(key, fresh=False))
        if tensor.dtype in (torch.bfloat16, torch.float16, torch.float64):
            tensor = tensor.to(torch.float32)
        return np.asarray(tensor.numpy(), dtype=dtype)

    def read(
        self,
        key: str,
        dtype: str,
        rows: tuple[int, int] | None = None,
        permute: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """Rows [start, stop) (default all) of one tensor, axes permuted, in the stored dtype
        ('bfloat16' / 'float32'), converted in one copy without a float32 intermediate. The
        checkpoint is reopened for the read, so its mapped pages are released afterwards."""
        import ml_dtypes
        import torch

        if dtype not in ("bfloat16", "float32"):
            raise ConversionError(f"unsupported --dtype {dtype!r}; use float32 or bfloat16")
        tensor = self._tensor(key, fresh=True)
        if rows is not None:
            tensor = tensor[rows[0] : rows[1]]
        if permute is not None:
            tensor = tensor.permute(*permute)
        if not tensor.is_floating_point():
            self._checked(key, tensor)  # raises: integers would be silently made floats
        out = torch.empty(tensor.shape, dtype=getattr(torch, dtype))
        out.copy_(tensor)
        del tensor
        self._checked(key, out, f" rows [{rows[0]}, {rows[1]})" if rows else "")
        if dtype == "bfloat16":
            return out.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return out.numpy()


def _is_float_name(dtype: str) -> bool:
    return dtype.lower().startswith(("f", "bf")) or dtype.lower() in ("half", "double")


def strip_prefix(keys: Iterable[str], prefixes: Iterable[str]) -> dict[str, str]:
    """{key without the first matching prefix: original key} for wrapped state dicts."""
    out = {}
    for key in keys:
        bare = key
        for prefix in prefixes:
            if key.startswith(prefix):
                bare = key[len(prefix) :]
                break
        out[bare] = key
    return out


def check_keys(
    source_path: str,
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    optional: Iterable[str] = (),
) -> None:
    """Compares a checkpoint's {key: shape} with the expected one; raises one error listing every
    missing, unexpected and mis-shaped tensor (keys in `optional` may be absent)."""
    optional = set(optional)
    missing = sorted(k for k in expected if k not in shapes and k not in optional)
    unexpected = sorted(k for k in shapes if k not in expected)
    misshaped = sorted(
        f"{k}: checkpoint {tuple(shapes[k])}, expected {tuple(expected[k])}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k])
    )
    if missing or unexpected or misshaped:
        lines = [f"{source_path} does not match the expected model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in shown)
        raise ConversionError("\n".join(lines))


def cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array -> the stored dtype ('float32' or 'bfloat16')."""
    if dtype == "float32":
        return np.asarray(array, np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(array, ml_dtypes.bfloat16)
    raise ConversionError(f"unsupported --dtype {dtype!r}; use float32 or bfloat16")


def config_json(source: TensorSource) -> dict:
    """The config.json next to the checkpoint (diffusers / transformers write one), {} if none."""
    folder = source.path if os.path.isdir(source.path) else os.path.dirname(os.path.abspath(source.path))
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read config.json next to the weights: {e}") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: config.json holds a {type(config).__name__}, not an object")
    return config


def nest(path: Iterable[str], value) -> dict:
    """('a', 'b'), v -> {'a': {'b': v}}: one parameter as a tree for ParamsWriter.add."""
    for name in reversed(tuple(path)):
        value = {name: value}
    return value


def _refusal(error: Exception) -> str:
    """torch's weights_only refusal in one plain line: its message spans paragraphs, carries ANSI
    escapes in some versions and advice to load unsafely; only the object it refused is kept."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text)
    what = f"it would import {found.group(1)}" if found else "it holds objects other than tensors"
    return f"{what}; only plain tensor state dicts are read (torch.load weights_only=True)"
