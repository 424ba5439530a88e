"""The embedded default model shipped inside the package (pyratok/assets/default)."""

from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
HELD_OUT = 0.2   # the last 20% of every training clip is held out (scripts/make_default_data.py)


def held_out_start(frames: int) -> int:
    """Index of the first held-out frame of a clip with ``frames`` frames."""
    return round(frames * (1 - HELD_OUT))


def default_model_path() -> str:
    """Folder of the bundled tiny PyraTok (trained by scripts/train_default.sh)."""
    return os.path.join(ASSETS, "default")


def load_default_model(device: str = "cpu"):
    from pyratok.models.pyratok import PyraTok

    path = default_model_path()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"the bundled default model is missing from {path}; reinstall pyratok "
                                "or train one with scripts/train_default.sh")
    return PyraTok.from_pretrained(path, device=device).eval()
