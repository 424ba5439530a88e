"""PyraTok model components: text encoders, the AR prior (backbone, LaPQ and PyraTok follow)."""

from pyratok.models.lapq import LaPQ, LaPQConfig, LaPQOutput, latent_grid, level_grids, token_count
from pyratok.models.prior import ARPrior, HFCausalLMPrior, PriorConfig, PriorOutput
from pyratok.models.text import HFTextEncoder, NullText, TextEmbedding, default_text_encoder

__all__ = [
    "LaPQ",
    "LaPQConfig",
    "LaPQOutput",
    "latent_grid",
    "level_grids",
    "token_count",
    "ARPrior",
    "HFCausalLMPrior",
    "HFTextEncoder",
    "NullText",
    "PriorConfig",
    "PriorOutput",
    "TextEmbedding",
    "default_text_encoder",
]
