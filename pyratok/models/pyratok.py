"""PyraTok: a frozen causal video VAE + LaPQ + text encoder + global AR prior (DESIGN.md §3).

    video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k
      -> backbone encoder (frozen, LoRA on its convolutions) -> latent mean + stage features
      -> normalised latent r_0 -> LaPQ (L levels, shared K-bit codebook, text cross-attention)
      -> per-level token ids  (encode)            -> q_L -> frozen decoder -> video  (decode)

``encode`` returns :class:`pyratok.tokens.Tokens`; ``decode`` rebuilds the video from the
token ids alone; ``forward`` returns the reconstruction and a :class:`LossBreakdown` of
every training term.  ``save_pretrained`` / ``from_pretrained`` use a folder with
``config.json`` and ``model.safetensors`` (the backbone included, or referenced by path).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from pyratok.metrics import ssim
from pyratok.models import losses as L
from pyratok.models.lapq import LaPQ, LaPQConfig, LaPQOutput
from pyratok.models.masking import MaskingConfig
from pyratok.models.prior import ARPrior, PriorConfig
from pyratok.models.text import HFTextEncoder, NullText, TextEmbedding, default_text_encoder
from pyratok.models.vae import WanVAE, WanVAEConfig
from pyratok.tokens import Tokens
from pyratok.utils import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "pyratok-model"
FORMAT_VERSION = 1


@dataclass
class PyraTokConfig:
    backbone: WanVAEConfig = field(default_factory=WanVAEConfig)
    lapq: LaPQConfig = field(default_factory=LaPQConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    loss: L.LossConfig = field(default_factory=L.LossConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    text_encoder: Optional[str] = "default"   # "default" (offline MiniLM), a local HF folder, or None
    text_layer: int = -1
    lora_rank: int = 16                       # 0: no LoRA (the encoder stays fully frozen)
    lora_alpha: float = 32.0
    tap_stages: Optional[tuple[int, ...]] = None  # encoder stage feeding each level, coarse to fine
    use_prior: bool = True
    backbone_path: Optional[str] = None       # backbone weights (diffusers folder / Wan .pth) loaded at build

    @classmethod
    def tiny(cls, **overrides) -> "PyraTokConfig":
        """Seconds on a CPU: tests, docs, examples and the embedded default model."""
        cfg = cls(
            backbone=WanVAEConfig(base_dim=16, z_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                  latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8),
            lapq=LaPQConfig(num_bits=16, levels=4, hidden=48, heads=2),
            prior=PriorConfig(width=64, depth=2, heads=2),
            lora_rank=4, lora_alpha=8.0,
        )
        return dataclasses.replace(cfg, **overrides)

    @classmethod
    def paper(cls, **overrides) -> "PyraTokConfig":
        """Wan 2.1 backbone (4x8x8, z=16), L=4, K=16, LoRA 16/32, the paper's loss weights."""
        return dataclasses.replace(cls(), **overrides)

    def tap_stage_list(self) -> list[int]:
        stages = len(self.backbone.dim_mult)
        taps = self.tap_stages or tuple(max(0, stages - 1 - l) for l in range(self.lapq.levels))
        if len(taps) != self.lapq.levels or not all(0 <= s < stages for s in taps):
            raise ValueError(f"tap_stages={list(taps)}: need {self.lapq.levels} stage indices in 0..{stages - 1}")
        return list(taps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PyraTokConfig":
        d = dict(d)

        def tuples(sub):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}

        try:
            return cls(backbone=WanVAEConfig.from_dict(d.pop("backbone")), lapq=LaPQConfig(**tuples(d.pop("lapq"))),
                       prior=PriorConfig(**d.pop("prior")), loss=L.LossConfig(**d.pop("loss")),
                       masking=MaskingConfig(**d.pop("masking")),
                       **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except (KeyError, TypeError) as err:
            raise ValueError(f"config: not a PyraTok config ({err})") from None


TextInput = Union[None, str, Sequence[str], TextEmbedding]


class PyraTok(nn.Module):
    def __init__(self, config: PyraTokConfig = PyraTokConfig(), text_encoder: Optional[nn.Module] = None,
                 inference_lora: bool = False):
        """inference_lora: build the LoRA adapters without peft (pyratok.models.lora_inference):
        same weights and outputs, no import of peft/transformers, but no training helpers."""
        super().__init__()
        config = copy.deepcopy(config)
        if text_encoder is None and config.text_encoder is not None:
            text_encoder = (default_text_encoder(layer=config.text_layer) if config.text_encoder == "default"
                            else HFTextEncoder(config.text_encoder, layer=config.text_layer))
        self.text_encoder = text_encoder
        text_dim = text_encoder.dim if text_encoder is not None else config.lapq.text_dim
        self.vae = WanVAE(config.backbone)
        if config.backbone_path:
            self.vae.load_backbone_state_dict(WanVAE.from_pretrained(config.backbone_path).backbone_state_dict())
        self.vae.requires_grad_(False)
        self.taps = config.tap_stage_list()
        stage_dims = [config.backbone.base_dim * m for m in config.backbone.dim_mult]
        config.lapq = dataclasses.replace(config.lapq, latent_dim=config.backbone.z_dim, text_dim=text_dim,
                                          feature_dims=tuple(stage_dims[s] for s in self.taps))
        config.prior = dataclasses.replace(config.prior, num_bits=config.lapq.num_bits, text_dim=text_dim,
                                           max_levels=max(config.prior.max_levels, config.lapq.levels))
        self.config = config
        self.lapq = LaPQ(config.lapq)
        self.null_text = NullText(text_dim)
        self.prior = ARPrior(config.prior) if config.use_prior else None
        if config.lora_rank > 0 and inference_lora:
            from pyratok.models.lora_inference import add_inference_lora

            add_inference_lora(self.vae, self.vae._conv_names("encoder"), config.lora_rank, config.lora_alpha)
        elif config.lora_rank > 0:
            self.vae.add_lora(rank=config.lora_rank, alpha=config.lora_alpha, target="encoder")
        self.lpips = None
        self._model_id = "unsaved-" + hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """Identifies the weights: sha256 of config + weights when saved/loaded, else of the config."""
        return self._model_id

    @property
    def num_bits(self) -> int:
        return self.config.lapq.num_bits

    def load_lpips(self, path: str) -> None:
        """Enables the LPIPS reconstruction term with weights from a local file (pyratok.lpips)."""
        from pyratok.lpips import LPIPS

        self.lpips = LPIPS.from_file(path).to(next(self.parameters()).device)

    def _text(self, text: TextInput, batch: int) -> TextEmbedding:
        if text is None:
            return self.null_text(batch)
        if isinstance(text, TextEmbedding):
            emb = text
        else:
            if self.text_encoder is None:
                raise ValueError("text: this model has no text encoder (config.text_encoder=None); pass text=None "
                                 "or a TextEmbedding")
            prompts = [text] if isinstance(text, str) else list(text)
            if len(prompts) == 1 and batch > 1:
                prompts = prompts * batch
            emb = self.text_encoder(prompts)
        if emb.batch_size != batch:
            raise ValueError(f"text: {emb.batch_size} prompts for a batch of {batch} videos")
        return emb.to(self.null_text.embedding.device)

    def _latent_grid(self, video: torch.Tensor):
        T, H, W = video.shape[2:]
        return (1 + (T - 1) // self.vae.temporal_factor, H // self.vae.spatial_factor, W // self.vae.spatial_factor)

    # -- the pipeline ----------------------------------------------------------------------

    def _encode_latent(self, video: torch.Tensor, tile: Optional[int] = None, overlap: Optional[int] = None):
        dist, features = self.vae.encoder_features(video, tile=tile, overlap=overlap)
        return self.vae.normalize_latents(dist.mean), [features[s] for s in self.taps]

    def quantize(self, video: torch.Tensor, text: TextInput = None, tile: Optional[int] = None,
                 overlap: Optional[int] = None) -> LaPQOutput:
        """video -> LaPQ output (codes, token ids, bit logits, ...) of every level."""
        latent, taps = self._encode_latent(video, tile, overlap)
        return self.lapq(latent, taps, self._text(text, video.shape[0]))

    def _decode_quantized(self, quantized: torch.Tensor, tile: Optional[int] = None,
                          overlap: Optional[int] = None) -> torch.Tensor:
        chunk = None if tile is None else 1   # a tiled decode streams frame by frame to bound memory
        return self.vae.decode(self.vae.denormalize_latents(quantized), chunk_frames=chunk, tile=tile, overlap=overlap)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, text: TextInput = None, tile: Optional[int] = None,
               overlap: Optional[int] = None) -> Tokens:
        """video (B, 3, 1+4k, H, W) in [-1, 1] -> Tokens (per-level ids in one shared index space).

        The backbone streams the clip 1 + 4 + 4 + ... frames at a time; ``tile`` (latent pixels)
        also splits every frame into overlapping tiles (WanVAE.encode); with the default overlap
        the tiled tokens equal the untiled ones up to fp32 rounding of the blend."""
        out = self.quantize(video, text, tile, overlap)
        captions = None
        if isinstance(text, str):
            captions = [text] * video.shape[0]
        elif isinstance(text, (list, tuple)):
            captions = list(text) if len(text) == video.shape[0] else list(text) * video.shape[0]
        T, H, W = video.shape[2:]
        return Tokens(out.indices, self.num_bits, out.grids, self._latent_grid(video),
                      {"frames": T, "height": H, "width": W}, self.model_id, captions)

    def check_tokens(self, tokens: Tokens) -> None:
        if tokens.num_bits != self.num_bits or tokens.levels != self.config.lapq.levels:
            raise ValueError(f"tokens: K={tokens.num_bits} with {tokens.levels} levels, this model has "
                             f"K={self.num_bits} with {self.config.lapq.levels} levels")
        want = self.lapq.grids(tokens.latent_grid)
        if list(tokens.grids) != want:
            raise ValueError(f"tokens: level grids {tokens.grids} do not match this model's {want} "
                             f"for latent grid {tokens.latent_grid}")
        if tokens.model_id and tokens.model_id != self.model_id:
            raise ValueError(f"tokens: made by model {tokens.model_id}, this is model {self.model_id}")

    @torch.no_grad()
    def decode(self, tokens: Tokens, tile: Optional[int] = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Tokens -> video (B, 3, T, H, W) in [-1, 1], from the token ids alone; ``tile`` as in encode."""
        self.check_tokens(tokens)
        device = self.null_text.embedding.device
        codes = self.lapq.codes_from_tokens([i.to(device) for i in tokens.ids])
        return self._decode_quantized(self.lapq.dequantize(codes, tokens.latent_grid), tile, overlap)

    @contextlib.contextmanager
    def _adapters_off(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.vae.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)

    def forward(self, video: torch.Tensor, text: TextInput = None, masked_video: Optional[torch.Tensor] = None,
                process_group=None, step: Optional[int] = None):
        """-> (reconstruction (B, 3, T, H, W), LossBreakdown).  ``masked_video`` (same shape) is
        what the encoder sees when training with masking; the target is always ``video``.
        ``step`` (the training step) schedules the lazy drift term (LossConfig.drift_every);
        None computes every term."""
        cfg = self.config.loss
        enc_in = video if masked_video is None else masked_video
        if masked_video is not None and masked_video.shape != video.shape:
            raise ValueError(f"masked_video: shape {tuple(masked_video.shape)} differs from video {tuple(video.shape)}")
        latent, taps = self._encode_latent(enc_in)
        text_emb = self._text(text, video.shape[0])
        out = self.lapq(latent, taps, text_emb)
        recon = self._decode_quantized(out.quantized)
        terms: dict[str, Optional[torch.Tensor]] = {}
        if cfg.recon:
            terms["l1"] = (recon - video).abs().mean() if cfg.l1 else None
            terms["ssim"] = 1 - ssim(recon, video, clamp=False) if cfg.ssim else None
            terms["lpips"] = self.lpips(recon, video) if (cfg.lpips and self.lpips is not None) else None
        if cfg.codebook:
            terms.update(L.codebook_terms(out, cfg, process_group))
        if cfg.ar and self.prior is not None:
            terms["ar"] = self.prior(text_emb, out.codes).loss
        drift_weight = cfg.drift if step is None else (cfg.drift * cfg.drift_every if step % cfg.drift_every == 0
                                                       else 0.0)
        if drift_weight and self.config.lora_rank > 0:
            with torch.no_grad(), self._adapters_off():
                frozen = self.vae.encoder_taps(enc_in)       # the convolutional part only: no latent head
            frozen = [frozen[s] for s in self.taps]
            terms["drift"] = sum(F.mse_loss(a, b) for a, b in zip(taps, frozen)) / len(taps)
        total = recon.new_zeros(())
        recon_parts = [getattr(cfg, k) * terms[k] for k in ("l1", "ssim", "lpips") if terms.get(k) is not None]
        if recon_parts:
            total = total + cfg.recon * sum(recon_parts)
        codebook = L.codebook_total({k: terms.get(k) for k in ("commitment", "entropy", "hierarchy", "text_token",
                                                               "text_code")}, cfg)
        if codebook is not None:
            total = total + cfg.codebook * codebook
        if terms.get("ar") is not None:
            total = total + cfg.ar * terms["ar"]
        if terms.get("drift") is not None:
            total = total + drift_weight * terms["drift"]
        return recon, L.LossBreakdown(total, {k: v for k, v in terms.items() if v is not None}, out.indices)

    def backbone_forward(self, video: torch.Tensor, kl_weight: float = 1e-6):
        """Trains the backbone itself (stage 0, when no pretrained VAE exists): plain VAE
        reconstruction through a sampled latent, no quantizer.  -> (recon, LossBreakdown)."""
        cfg = self.config.loss
        dist = self.vae.encode(video, chunk_frames=None)
        recon = self.vae.decode(dist.sample(), chunk_frames=None)
        terms = {"l1": (recon - video).abs().mean(), "ssim": 1 - ssim(recon, video, clamp=False),
                 "kl": dist.kl().mean()}
        total = cfg.l1 * terms["l1"] + cfg.ssim * terms["ssim"] + kl_weight * terms["kl"]
        return recon, L.LossBreakdown(total, terms)

    # -- saving and loading ----------------------------------------------------------------

    def _saved_state(self, include_backbone: bool, state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
        backbone = {"vae." + k for k in self.vae.state_dict() if ".lora_" not in k}
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()
                if not k.startswith(("text_encoder.", "lpips.")) and (include_backbone or k not in backbone)}

    def save_pretrained(self, path: str, include_backbone: bool = True, state_dict: Optional[dict] = None) -> None:
        """Writes ``config.json`` + ``model.safetensors`` (atomically).  include_backbone=False
        leaves the frozen backbone out; ``config.backbone_path`` must then point to it.
        ``state_dict`` replaces this module's own (a full state dict gathered from FSDP shards)."""
        from safetensors.torch import save

        if not include_backbone and not self.config.backbone_path:
            raise ValueError("include_backbone=False needs config.backbone_path (where the backbone weights live)")
        state = self._saved_state(include_backbone, state_dict)
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for k in sorted(state):
            digest.update(k.encode())
            digest.update(state[k].numpy().tobytes() if state[k].dtype != torch.bfloat16 else state[k].view(torch.int16).numpy().tobytes())
        self._model_id = digest.hexdigest()[:16]
        os.makedirs(path, exist_ok=True)
        with atomic_write(os.path.join(path, WEIGHTS_FILE)) as f:
            f.write(save(state, metadata={"format": FORMAT, "model_id": self._model_id}))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_id": self._model_id,
                "includes_backbone": include_backbone, "config": self.config.to_dict()}
        with atomic_write(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, text_encoder: Optional[nn.Module] = None,
                        device: Union[str, torch.device] = "cpu", inference: bool = False) -> "PyraTok":
        """inference=True: LoRA adapters without peft (``inference_lora``), for encoding and decoding;
        loads faster (peft and transformers are not imported) and gives the same outputs."""
        from safetensors.torch import load_file

        cfg_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
        for f in (cfg_file, weights_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: a PyraTok folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        with open(cfg_file) as fh:
            meta = json.load(fh)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: not a PyraTok model folder (format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_file}: model format version {meta.get('format_version')}, this pyratok reads "
                             f"{FORMAT_VERSION}")
        config = PyraTokConfig.from_dict(meta["config"])
        includes_backbone = meta.get("includes_backbone", True)
        if not includes_backbone and not config.backbone_path:
            raise ValueError(f"{cfg_file}: the backbone is not included and config.backbone_path is empty")
        if includes_backbone:  # the file has the weights: do not read them from elsewhere first
            config = dataclasses.replace(config, backbone_path=None)
        model = cls(config, text_encoder, inference_lora=inference)
        model.config.backbone_path = meta["config"].get("backbone_path")
        state = load_file(weights_file)
        own = model._saved_state(includes_backbone)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(f"{weights_file}: weights do not fit config.json (K={config.lapq.num_bits}, "
                             f"levels={config.lapq.levels})"
                             + (f"\n  missing ({len(missing)}): {missing[:8]}" if missing else "")
                             + (f"\n  unexpected ({len(unexpected)}): {unexpected[:8]}" if unexpected else "")
                             + (f"\n  shape mismatches ({len(shapes)}): {shapes[:8]}" if shapes else ""))
        model.load_state_dict(state, strict=False)
        model._model_id = meta["model_id"]
        return model.to(device)
