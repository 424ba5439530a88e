"""PyraTok model components: the Wan causal video VAE backbone, LaPQ, text encoders, the AR
prior and the PyraTok model (pyratok.models.pyratok)."""

from pyratok.models.lapq import LaPQ, LaPQConfig, LaPQOutput, latent_grid, level_grids, token_count
from pyratok.models.prior import ARPrior, HFCausalLMPrior, PriorConfig, PriorOutput
from pyratok.models.text import HFTextEncoder, NullText, TextEmbedding, default_text_encoder
from pyratok.models.vae import LatentDistribution, WanVAE, WanVAEConfig, fit_frames, patchify, unpatchify

__all__ = [
    "ARPrior",
    "HFCausalLMPrior",
    "HFTextEncoder",
    "LaPQ",
    "LaPQConfig",
    "LaPQOutput",
    "LatentDistribution",
    "NullText",
    "PriorConfig",
    "PriorOutput",
    "TextEmbedding",
    "WanVAE",
    "WanVAEConfig",
    "default_text_encoder",
    "fit_frames",
    "latent_grid",
    "level_grids",
    "patchify",
    "token_count",
    "unpatchify",
]
