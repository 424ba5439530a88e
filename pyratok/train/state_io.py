"""Trainer state on disk without pickle: tensors in safetensors, everything else in JSON.

A trainer state is a tree of dicts, lists, tuples, strings, numbers, booleans, None and
tensors (optimizer and scheduler ``state_dict()``, RNG states, the EMA weights, counters).
``save_state`` writes the tensors to ``<stem>.safetensors`` and the tree, with each tensor
replaced by ``{"__tensor__": key}``, to ``<stem>.json``; ``load_state`` rebuilds it.  Nothing
read back can name a Python class or run code: a planted file yields a load error, never an
object (issue 19: ``torch.load(weights_only=False)`` on a checkpoint ran ``os.system``).

Containers JSON cannot hold as is are tagged: tuples ``{"__tuple__": [...]}`` and dicts with
non-string keys (the optimizer's integer parameter ids) ``{"__items__": [[key, value], ...]}``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from pyratok.utils import atomic_write

MAX_JSON_BYTES = 64 << 20  # a trainer state's JSON is kilobytes; refuse to parse a planted giant


class StateFileError(ValueError):
    """A trainer state file that is missing, truncated, corrupted or not one of ours."""


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()  # safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors, f"{path}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be stored in a trainer state (tensors, numbers, "
                    "strings, lists, tuples and dicts only)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise StateFileError(f"{where}: refers to tensor {key!r}, which the .safetensors file lacks")
        return tensors[key]
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        items = obj["__items__"]
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
            raise StateFileError(f"{where}: malformed __items__ entry")
        return {k: _unflatten(v, tensors, where) for k, v in items}
    return {k: _unflatten(v, tensors, where) for k, v in obj.items()}


def save_state(folder: str, stem: str, state: dict) -> None:
    """Writes ``folder/<stem>.safetensors`` then ``folder/<stem>.json`` (each atomically)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, stem)
    with atomic_write(os.path.join(folder, stem + ".safetensors")) as f:
        f.write(save(tensors, metadata={"format": "pyratok-trainer-state"}))
    with atomic_write(os.path.join(folder, stem + ".json"), "w") as f:
        json.dump(tree, f)


def state_files(folder: str, stem: str) -> tuple[str, str]:
    return os.path.join(folder, stem + ".json"), os.path.join(folder, stem + ".safetensors")


def load_state(folder: str, stem: str) -> dict:
    """The tree written by :func:`save_state`; StateFileError for anything else."""
    from safetensors.torch import load

    json_file, tensor_file = state_files(folder, stem)
    for f in (json_file, tensor_file):
        if not os.path.isfile(f):
            raise StateFileError(f"{f}: missing (not a complete checkpoint)")
    if os.path.getsize(json_file) > MAX_JSON_BYTES:
        raise StateFileError(f"{json_file}: {os.path.getsize(json_file)} bytes, more than a trainer state holds")
    try:
        with open(json_file) as f:
            tree = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateFileError(f"{json_file}: not valid JSON ({err})") from None
    try:
        with open(tensor_file, "rb") as f:
            tensors = load(f.read())
    except Exception as err:  # safetensors raises several types for damaged bytes
        raise StateFileError(f"{tensor_file}: truncated or corrupted ({type(err).__name__}: {err})") from None
    state = _unflatten(tree, tensors, json_file)
    if not isinstance(state, dict):
        raise StateFileError(f"{json_file}: expected a JSON object at the top, got {type(state).__name__}")
    return state
