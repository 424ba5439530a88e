"""The embedded default model shipped inside the package (pyratok/assets/default).

Two operating points, each a self-contained model folder: ``"low"`` (K = 16 bits per token on a
4x8x8 backbone, about 0.1 bits per pixel, the paper's operating point; the default) and ``"high"``
(K = 48 on a finer 2x4x4 backbone of its own, about 2.1 bits per pixel).  Trained by
scripts/train_default.sh; model card: ``assets/default/README.md``."""

from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
HELD_OUT = 0.2   # the last 20% of every training clip is held out (scripts/make_default_data.py)


def held_out_start(frames: int) -> int:
    """Index of the first held-out frame of a clip with ``frames`` frames."""
    return round(frames * (1 - HELD_OUT))


RATES = ("low", "high")   # the bundled operating points


def default_model_path(rate: str = "low") -> str:
    """Folder of the bundled PyraTok at operating point ``rate`` ("low" or "high")."""
    if rate not in RATES:
        raise ValueError(f"rate={rate!r}: the bundled model has the operating points {', '.join(map(repr, RATES))}")
    return os.path.join(ASSETS, "default", rate)


def load_default_model(device: str = "cpu", rate: str = "low"):
    from pyratok.models.pyratok import PyraTok

    path = default_model_path(rate)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"the bundled default model is missing from {path}; reinstall pyratok "
                                "or train one with scripts/train_default.sh")
    return PyraTok.from_pretrained(path, device=device).eval()
