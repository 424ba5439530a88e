"""Checks on model folders before anything is built or loaded (issue 19).

* ``config.json`` must be a JSON object of our format whose config has the expected keys and
  types (a list, missing keys, ``"base_dim": "16"`` or invalid JSON are errors naming the file);
* dimensions are bounded: an estimate of the parameter count of the network a config builds
  must stay under ``pyratok.utils.MAX_MODEL_PARAMS``, checked before a single tensor exists;
* the weights file's sha256 is recorded in ``config.json`` (``weights_sha256``) by
  ``save_pretrained`` and verified by ``from_pretrained``: a flipped byte, a truncated file or
  another model's weights are refused.  The model id written into token files is a digest of
  the config and these weights, so tokens name the exact weights that made them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from typing import Any

from pyratok.utils import MAX_MODEL_PARAMS

MAX_CONFIG_BYTES = 16 << 20


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from ``path``; ValueError naming the path for anything else."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {size} bytes, too large for a {what}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got a {type(data).__name__}")
    return data


def check_field_types(config: Any, where: str, prefix: str = "config") -> None:
    """Every field of a (nested) config dataclass has its default's type: ints are ints (not
    bools or strings), floats are numbers, tuples hold numbers where the default does."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}.{f.name}"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not dataclasses.is_dataclass(value):
                raise ValueError(f"{where}: {name} must be an object")
            check_field_types(value, where, name)
            continue
        optional = "Optional" in str(f.type) or "None" in str(f.type)
        if default is None or (value is None and optional):
            continue
        _check_value(value, default, where, name)


def _check_value(value, default, where: str, name: str) -> None:
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"{where}: {name}={value} is not a finite number")
    elif kind in (tuple, list):
        ok = isinstance(value, (tuple, list))
        if ok and default:
            for i, v in enumerate(value):
                _check_value(v, default[0], where, f"{name}[{i}]")
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{where}: {name}={value!r} has the wrong type (expected {kind.__name__})")


def _bounded(where: str, name: str, value, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{where}: {name}={value} is out of range ({low}..{high})")


def check_dimensions(config, where: str) -> None:
    """Bounds the sizes in a PyraTokConfig before the model is built: per-field ranges, then an
    estimate of the parameter count (convolutions 27 C^2, transformer layers 12 d^2)."""
    b, q, p = config.backbone, config.lapq, config.prior
    _bounded(where, "backbone.base_dim", b.base_dim, 1, 4096)
    _bounded(where, "backbone.z_dim", b.z_dim, 1, 1024)
    _bounded(where, "backbone.num_res_blocks", b.num_res_blocks, 0, 64)
    _bounded(where, "len(backbone.dim_mult)", len(b.dim_mult), 1, 8)
    for i, m in enumerate(b.dim_mult):
        _bounded(where, f"backbone.dim_mult[{i}]", m, 1, 64)
    _bounded(where, "lapq.num_bits", q.num_bits, 1, 64)
    _bounded(where, "lapq.levels", q.levels, 1, 16)
    _bounded(where, "lapq.hidden", q.hidden, 1, 16384)
    _bounded(where, "prior.width", p.width, 1, 16384)
    _bounded(where, "prior.depth", p.depth, 0, 256)
    _bounded(where, "lora_rank", config.lora_rank, 0, 4096)
    decoder_base = b.decoder_base_dim or b.base_dim
    vae = sum(2 * (2 * b.num_res_blocks + 2) * 27 * (base * m) ** 2
              for base in (b.base_dim, decoder_base) for m in b.dim_mult)
    estimate = vae + q.levels * 16 * q.hidden ** 2 + (12 * p.depth * p.width ** 2 if config.use_prior else 0)
    if estimate > MAX_MODEL_PARAMS:
        raise ValueError(f"{where}: these dimensions build about {estimate / 1e9:.1f} billion parameters, more "
                         f"than the {MAX_MODEL_PARAMS / 1e9:.0f} billion limit (base_dim={b.base_dim}, "
                         f"dim_mult={list(b.dim_mult)}, lapq.hidden={q.hidden}, prior.width={p.width})")


def verify_weights(weights_file: str, meta: dict, cfg_file: str) -> None:
    """The weights file is not empty and matches the sha256 recorded in config.json (folders
    saved before checksums were recorded get a warning)."""
    size = os.path.getsize(weights_file)
    if size < 8:
        raise ValueError(f"{weights_file}: {size} bytes, not a weights file (empty or truncated)")
    recorded = meta.get("weights_sha256")
    if recorded is None:
        warnings.warn(f"{cfg_file} records no weights_sha256 (saved by an older pyratok): the weights are "
                      "not verified; save_pretrained again to add it", stacklevel=3)
        return
    if not isinstance(recorded, str):
        raise ValueError(f"{cfg_file}: weights_sha256 must be a string")
    actual = file_sha256(weights_file)
    if actual != recorded:
        raise ValueError(f"{weights_file}: sha256 {actual[:16]}... does not match weights_sha256 "
                         f"{recorded[:16]}... in {os.path.basename(cfg_file)}: the weights are corrupted or "
                         "belong to another model")


# -- 8-bit weight storage (format version 2) ------------------------------------------------------
# A weight with more than one value per output channel is stored as int8 with one float32 scale per
# output channel (symmetric: scale = max |w| / 127 over the channel); the rest (biases, norm gains)
# keeps its dtype here (save_pretrained stores it in float16).  The scale of weight "a.b.weight" is
# stored as "a.b.weight" + INT8_SCALE_SUFFIX.
INT8_SCALE_SUFFIX = ".int8_scale"


def quantize_int8(state: dict) -> dict:
    """``state`` with every floating weight of >= 2 dims and > 1 value per output channel stored as
    int8 plus a per-output-channel float32 scale (see above)."""
    import torch

    out = {}
    for name, value in state.items():
        if not value.is_floating_point() or value.dim() < 2 or value.numel() == 0 or value[0].numel() < 2:
            out[name] = value
            continue
        rows = value.detach().float().reshape(value.shape[0], -1)
        scale = rows.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # an all-zero channel stays zero
        out[name] = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(value.shape)
        out[name + INT8_SCALE_SUFFIX] = scale.contiguous()
    return out


def dequantize_int8(state: dict, where: str) -> dict:
    """The float32 weights of a ``quantize_int8`` state (checked: every int8 tensor has its scale, every
    scale a float32 vector with one value per output channel of its int8 weight)."""
    import torch

    out = {k: v for k, v in state.items() if not k.endswith(INT8_SCALE_SUFFIX)}
    for key, scale in state.items():
        if not key.endswith(INT8_SCALE_SUFFIX):
            continue
        name = key[: -len(INT8_SCALE_SUFFIX)]
        q = state.get(name)
        if q is None or q.dtype != torch.int8 or q.dim() < 2:
            raise ValueError(f"{where}: {key} is the scale of an 8-bit weight {name}, but the file has "
                             f"{'no such weight' if q is None else f'a {q.dtype} tensor of {q.dim()} dims'}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0],) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{where}: {key}: expected finite float32 scales of shape ({q.shape[0]},), "
                             f"got {scale.dtype} {tuple(scale.shape)}")
        out[name] = q.float() * scale.view(-1, *([1] * (q.dim() - 1)))
    stray = sorted(k for k, v in out.items() if v.dtype == torch.int8)
    if stray:
        raise ValueError(f"{where}: 8-bit weights without a scale ({INT8_SCALE_SUFFIX}): {stray[:4]}")
    return out
