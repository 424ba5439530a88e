"""The parts of Wan's causal video VAE; the public class is :class:`pyratok.models.vae.WanVAE`.

    config           WanVAEConfig (diffusers' AutoencoderKLWan fields) and its validation
    blocks           RMS norm, residual / attention blocks, Resample, Wan 2.2 shortcuts, stages
    encoder_decoder  Encoder and Decoder, each split into a tileable and a latent-resolution part
    latent           LatentDistribution
    shapes           patchify / unpatchify (Wan 2.2 patches), fit_frames (1 + 4k frames)
    streaming        chunk plans over time (the stream state itself is a pyratok.nn.StreamCache)
    tiling           tile_starts, blend_weights, run_tiled: spatial tiles and their blending
    checkpoint       diffusers folders and Wan checkpoint files (CheckpointMixin)
    wan21_keys       key mapping between the original Wan 2.1 .pth and diffusers' names
    lora             which convolutions LoRA adapts, and the adapter methods (LoRAMixin)

Nothing is imported here, so that importing one part does not import the others.
"""
