"""pyratok models: the Wan causal video VAE backbone (LaPQ, text encoders and the AR prior join here)."""

from pyratok.models.vae import LatentDistribution, WanVAE, WanVAEConfig, fit_frames, patchify, unpatchify

__all__ = ["LatentDistribution", "WanVAE", "WanVAEConfig", "fit_frames", "patchify", "unpatchify"]
