"""PyraTok: a frozen causal video VAE + LaPQ + text encoder + global AR prior (DESIGN.md §3).

    video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k
      -> backbone encoder (frozen, LoRA on its convolutions) -> latent mean + stage features
      -> normalised latent r_0 -> LaPQ (L levels, shared K-bit codebook, text cross-attention)
      -> per-level token ids  (encode)            -> q_L -> frozen decoder -> video  (decode)

``encode`` returns :class:`pyratok.tokens.Tokens`; ``encode_stream`` does the same chunk by
chunk (1 frame, then multiples of 4) with identical tokens; ``decode`` rebuilds the video from
the token ids alone (``levels=l``: from the first l levels only); ``forward`` returns the
reconstruction and a :class:`LossBreakdown` of every training term.  Tokens are causal: those
of latent frame t depend only on the input frames up to the ones latent frame t covers.  ``save_pretrained`` / ``from_pretrained`` use a folder with
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
from pyratok.models.lapq import causal_pool
from pyratok.models.masking import MaskingConfig
from pyratok.models.prior import ARPrior, HFCausalLMPrior, PriorConfig
from pyratok.models.text import HFTextEncoder, NullText, TextEmbedding, default_text_encoder
from pyratok.models.teacher import VisionTeacher
from pyratok.models.vae import WanVAE, WanVAEConfig
from pyratok.tokens import Tokens
from pyratok.utils import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "pyratok-model"
FORMAT_VERSION = 1
# version 2: the same, with weights stored in 8 bits (save_pretrained(dtype=torch.int8); model_files.quantize_int8)
FORMAT_VERSION_INT8 = 2
# the backbone decoder's weights (what train.train_decoder trains; save_pretrained(include_decoder=True))
DECODER_PREFIXES = ("vae.decoder.", "vae.post_quant_conv.")


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
    prior_path: Optional[str] = None          # a local Hugging Face causal LM folder as the AR prior
    lateral: bool = True                      # lateral encoder taps into LaPQ (False: the ablation without them)
    drift_teacher: Optional[str] = None       # a local HF vision model folder (DINOv2/v3, SigLIP, CLIP vision)
                                              # as the drift term's frozen teacher; None: the frozen VAE encoder
    backbone_path: Optional[str] = None       # backbone weights (diffusers folder / Wan .pth) loaded at build;
                                              # in a saved folder's config.json a relative path is relative
                                              # to that folder

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


@dataclass
class EncodeStream:
    """State of :meth:`PyraTok.encode_stream` for one clip: the backbone's stream cache and the
    number of input frames consumed so far."""

    cache: "object"
    frames: int = 0


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
                                          feature_dims=tuple(stage_dims[s] for s in self.taps)
                                          if config.lateral else ())
        config.prior = dataclasses.replace(config.prior, num_bits=config.lapq.num_bits, text_dim=text_dim,
                                           max_levels=max(config.prior.max_levels, config.lapq.levels))
        self.config = config
        self.lapq = LaPQ(config.lapq)
        self.null_text = NullText(text_dim)
        if not config.use_prior:
            self.prior = None
        elif config.prior_path:
            self.prior = HFCausalLMPrior(config.prior_path, config.lapq.num_bits, text_dim, config.prior.max_levels)
        else:
            self.prior = ARPrior(config.prior)
        if config.lora_rank > 0 and inference_lora:
            from pyratok.models.lora_inference import add_inference_lora

            add_inference_lora(self.vae, self.vae.lora_targets("encoder"), config.lora_rank, config.lora_alpha)
        elif config.lora_rank > 0:
            self.vae.add_lora(rank=config.lora_rank, alpha=config.lora_alpha, target="encoder")
        # drift teacher: frozen and never saved (like the text encoder); its projection head trains
        self.drift_teacher = VisionTeacher(config.drift_teacher) if config.drift_teacher else None
        self.drift_head = (nn.Conv3d(stage_dims[-1], self.drift_teacher.dim, 1) if self.drift_teacher is not None
                           else None)
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

    @staticmethod
    def _has_caption(text: TextInput, batch: int) -> torch.Tensor:
        """(B,) bool: the clips with a real caption (an empty string or no text has none)."""
        if text is None:
            return torch.zeros(batch, dtype=torch.bool)
        if isinstance(text, str):
            return torch.full((batch,), bool(text.strip()))
        if isinstance(text, (list, tuple)):
            flags = [bool(t.strip()) for t in text]
            return torch.tensor(flags * (batch // len(flags)) if len(flags) != batch else flags)
        return torch.ones(batch, dtype=torch.bool)                # a TextEmbedding

    def _latent_grid(self, video: torch.Tensor):
        T, H, W = video.shape[2:]
        return (1 + (T - 1) // self.vae.temporal_factor, H // self.vae.spatial_factor, W // self.vae.spatial_factor)

    # -- the pipeline ----------------------------------------------------------------------

    def _encode_latent(self, video: torch.Tensor, tile: Optional[int] = None, overlap: Optional[int] = None,
                       all_taps: bool = False):
        dist, features = self.vae.encoder_features(video, tile=tile, overlap=overlap)
        out = self.vae.normalize_latents(dist.mean), [features[s] for s in self.taps]
        return (*out, features) if all_taps else out

    def _teacher_drift(self, video: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """1 - cosine similarity between the projected deepest encoder features (latent frame rate
        and grid) and the frozen teacher's patch features of the same frames, pooled onto that grid
        over the VAE's causal frame groups."""
        student = self.drift_head(features[-1])                                # (B, D, t, h, w)
        with torch.no_grad():
            target = causal_pool(self.drift_teacher(video), tuple(student.shape[2:]))   # (B, D, t, h, w)
        return 1 - F.cosine_similarity(student.float(), target.float(), dim=1).mean()

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
        T, H, W = video.shape[2:]
        return Tokens(out.indices, self.num_bits, out.grids, self._latent_grid(video),
                      {"frames": T, "height": H, "width": W}, self.model_id, self._captions(text, video.shape[0]))

    @staticmethod
    def _captions(text: TextInput, batch: int) -> Optional[list[str]]:
        if isinstance(text, str):
            return [text] * batch
        if isinstance(text, (list, tuple)):
            return list(text) if len(text) == batch else list(text) * batch
        return None

    @torch.no_grad()
    def encode_stream(self, chunk: torch.Tensor, cache: Optional["EncodeStream"] = None,
                      text: TextInput = None) -> tuple[Tokens, "EncodeStream"]:
        """Encodes the next chunk of a clip: the first chunk has 1 + 4m frames, later ones 4m.
        -> (tokens of the chunk's latent frames, the stream state to pass with the next chunk).
        Concatenating the chunks' ids along time gives ``encode``'s tokens bit for bit, for any
        chunk plan: the backbone always runs 1 + 4 + 4 + ... frames per pass, as ``encode`` does,
        and LaPQ works per latent frame.  Pass the same ``text`` with every chunk."""
        from pyratok.nn import StreamCache

        state = EncodeStream(StreamCache()) if cache is None else cache
        tf = self.vae.temporal_factor
        first = state.frames == 0
        if chunk.dim() != 5 or chunk.shape[2] < 1 or (chunk.shape[2] - first) % tf:
            raise ValueError(f"chunk: {tuple(chunk.shape)}; the first chunk of a clip needs (B, 3, 1 + {tf}m, H, W), "
                             f"later ones {tf}m frames (this is {'the first' if first else 'a later'} chunk)")
        plan = ([1] if first else []) + [tf] * ((chunk.shape[2] - first) // tf)
        means, feats = [], []
        for piece in torch.split(chunk, plan, dim=2):
            feats.append([])
            means.append(self.vae.encode_stream(piece, state.cache, feats[-1]).mean)
        state.frames += chunk.shape[2]
        latent = self.vae.normalize_latents(torch.cat(means, dim=2))
        features = [torch.cat(level, dim=2) for level in zip(*feats)]
        out = self.lapq(latent, [features[s] for s in self.taps], self._text(text, chunk.shape[0]), first)
        T, H, W = chunk.shape[2:]
        frames = T if first else 1 + T                 # the chunk's latent grid, counted as a clip's
        return (Tokens(out.indices, self.num_bits, out.grids, tuple(latent.shape[2:]),
                       {"frames": frames, "height": H, "width": W}, self.model_id, self._captions(text, chunk.shape[0])),
                state)

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
    def decode(self, tokens: Tokens, tile: Optional[int] = None, overlap: Optional[int] = None,
               levels: Optional[int] = None) -> torch.Tensor:
        """Tokens -> video (B, 3, T, H, W) in [-1, 1], from the token ids alone; ``tile`` as in
        encode; ``levels`` = l decodes from the first (coarsest) l levels only (default: all)."""
        self.check_tokens(tokens)
        device = self.null_text.embedding.device
        codes = self.lapq.codes_from_tokens([i.to(device) for i in tokens.ids])
        return self._decode_quantized(self.lapq.dequantize(codes, tokens.latent_grid, levels), tile, overlap)

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
        latent, taps, taps_all = self._encode_latent(enc_in, all_taps=True)
        text_emb = self._text(text, video.shape[0])
        has_text = self._has_caption(text, video.shape[0]).to(video.device)
        out = self.lapq(latent, taps, text_emb)
        recon = self._decode_quantized(out.quantized)
        terms: dict[str, Optional[torch.Tensor]] = {}
        if cfg.recon:
            terms["l1"] = (recon - video).abs().mean() if cfg.l1 else None
            terms["ssim"] = 1 - ssim(recon, video, clamp=False) if cfg.ssim else None
            terms["lpips"] = self.lpips(recon, video) if (cfg.lpips and self.lpips is not None) else None
        if cfg.codebook:
            terms.update(L.codebook_terms(out, cfg, process_group, has_text, lapq=self.lapq))
        if cfg.ar and self.prior is not None:
            terms["ar"] = self.prior(text_emb, out.codes).loss
        drift_weight = cfg.drift if step is None else (cfg.drift * cfg.drift_every if step % cfg.drift_every == 0
                                                       else 0.0)
        if drift_weight and self.drift_teacher is not None:
            terms["drift"] = self._teacher_drift(enc_in, taps_all)
        elif drift_weight and self.config.lora_rank > 0:
            with torch.no_grad(), self._adapters_off():
                frozen = self.vae.encoder_taps(enc_in)       # the convolutional part only: no latent head
            frozen = [frozen[s] for s in self.taps]
            terms["drift"] = sum(F.mse_loss(a, b) for a, b in zip(taps, frozen)) / len(taps)
        total = recon.new_zeros(())
        recon_parts = [getattr(cfg, k) * terms[k] for k in ("l1", "ssim", "lpips") if terms.get(k) is not None]
        if recon_parts:
            total = total + cfg.recon * sum(recon_parts)
        codebook = L.codebook_total({k: terms.get(k) for k in L.CODEBOOK_TERMS}, cfg)
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

    def _saved_state(self, include_backbone: bool, state_dict: Optional[dict] = None,
                     include_decoder: bool = False) -> dict[str, torch.Tensor]:
        backbone = {"vae." + k for k in self.vae.state_dict() if ".lora_" not in k}
        if include_decoder:
            backbone = {k for k in backbone if not k.startswith(DECODER_PREFIXES)}
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()
                if not k.startswith(("text_encoder.", "lpips.", "drift_teacher."))
                and (include_backbone or k not in backbone)}

    def save_pretrained(self, path: str, include_backbone: bool = True, state_dict: Optional[dict] = None,
                        include_decoder: bool = False, dtype: Optional[torch.dtype] = None) -> None:
        """Writes ``config.json`` + ``model.safetensors`` (atomically).  include_backbone=False
        leaves the frozen backbone out; ``config.backbone_path`` must then point to it.
        include_decoder=True (with include_backbone=False) keeps the backbone's decoder in this
        folder: a decoder adapted to this model's quantizer (``train.train_decoder``) over a
        shared backbone; loading reads the backbone from ``backbone_path``, then this decoder.
        ``dtype`` stores the floating-point weights in that type (torch.float16 halves the file;
        they load back into the model's float32); torch.int8 stores every weight with more than one
        value per output channel in 8 bits with a float32 scale per output channel (a quarter of the
        file; the other tensors, biases and norm gains, in float16; format version 2).
        ``state_dict`` replaces this module's own (a full state dict gathered from FSDP shards)."""
        from safetensors.torch import save

        if not include_backbone and not self.config.backbone_path:
            raise ValueError("include_backbone=False needs config.backbone_path (where the backbone weights live)")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point
                                                                            or dtype == torch.int8)):
            raise ValueError(f"dtype={dtype!r}: expected a floating-point torch.dtype (e.g. torch.float16), "
                             "torch.int8 or None")
        include_decoder = bool(include_decoder or include_backbone)
        state = self._saved_state(include_backbone, state_dict, include_decoder)
        if dtype == torch.int8:
            from pyratok.models.model_files import INT8_SCALE_SUFFIX, quantize_int8

            state = {k: v.to(torch.float16) if v.is_floating_point() and not k.endswith(INT8_SCALE_SUFFIX) else v
                     for k, v in quantize_int8(state).items()}
        elif dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for k in sorted(state):
            digest.update(k.encode())
            digest.update(state[k].numpy().tobytes() if state[k].dtype != torch.bfloat16 else state[k].view(torch.int16).numpy().tobytes())
        self._model_id = digest.hexdigest()[:16]
        os.makedirs(path, exist_ok=True)
        blob = save(state, metadata={"format": FORMAT, "model_id": self._model_id})
        with atomic_write(os.path.join(path, WEIGHTS_FILE)) as f:
            f.write(blob)
        version = FORMAT_VERSION_INT8 if dtype == torch.int8 else FORMAT_VERSION
        meta = {"format": FORMAT, "format_version": version, "model_id": self._model_id,
                "weights_sha256": hashlib.sha256(blob).hexdigest(),  # verified by from_pretrained
                "includes_backbone": include_backbone, "includes_decoder": include_decoder,
                "config": self.config.to_dict()}
        with atomic_write(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, text_encoder: Optional[nn.Module] = None,
                        device: Union[str, torch.device] = "cpu", inference: bool = False) -> "PyraTok":
        """inference=True: LoRA adapters without peft (``inference_lora``), for encoding and decoding;
        loads faster (peft and transformers are not imported) and gives the same outputs."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from pyratok.models import model_files

        cfg_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
        for f in (cfg_file, weights_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: a PyraTok folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        meta = model_files.read_json_object(cfg_file, "PyraTok model config")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: not a PyraTok model folder (format={meta.get('format')!r})")
        if meta.get("format_version") not in (FORMAT_VERSION, FORMAT_VERSION_INT8):
            raise ValueError(f"{cfg_file}: model format version {meta.get('format_version')}, this pyratok reads "
                             f"{FORMAT_VERSION} and {FORMAT_VERSION_INT8}")
        if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("model_id"), str):
            raise ValueError(f"{cfg_file}: 'config' (an object) and 'model_id' (a string) are required")
        try:
            config = PyraTokConfig.from_dict(meta["config"])
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{cfg_file}: {str(err).splitlines()[0]}") from None
        model_files.check_field_types(config, cfg_file)
        model_files.check_dimensions(config, cfg_file)
        includes_backbone = meta.get("includes_backbone", True)
        if not isinstance(includes_backbone, bool):
            raise ValueError(f"{cfg_file}: includes_backbone must be true or false")
        if not includes_backbone and not config.backbone_path:
            raise ValueError(f"{cfg_file}: the backbone is not included and config.backbone_path is empty")
        includes_decoder = meta.get("includes_decoder", includes_backbone)
        if not isinstance(includes_decoder, bool) or (includes_backbone and not includes_decoder):
            raise ValueError(f"{cfg_file}: includes_decoder must be true or false (true when the backbone is included)")
        model_files.verify_weights(weights_file, meta, cfg_file)
        try:
            with safe_open(weights_file, "pt") as fh:
                file_id = (fh.metadata() or {}).get("model_id")
            state = load_file(weights_file)
        except Exception as err:  # safetensors raises several types for damaged bytes
            raise ValueError(f"{weights_file}: truncated or corrupted ({type(err).__name__}: {err})") from None
        if file_id is not None and file_id != meta["model_id"]:
            raise ValueError(f"{weights_file}: weights of model {file_id}, but {CONFIG_FILE} says model "
                             f"{meta['model_id']}: the files come from different models")
        if meta["format_version"] == FORMAT_VERSION_INT8:
            state = model_files.dequantize_int8(state, weights_file)
        if includes_backbone:  # the file has the weights: do not read them from elsewhere first
            config = dataclasses.replace(config, backbone_path=None)
        elif not os.path.isabs(config.backbone_path):
            # a relative backbone_path in a saved folder is relative to that folder (a model that
            # ships next to its backbone, like the bundled operating points and ../backbone)
            config = dataclasses.replace(config, backbone_path=os.path.normpath(os.path.join(path, config.backbone_path)))
        try:
            model = cls(config, text_encoder, inference_lora=inference)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{cfg_file}: cannot build the model ({str(err).splitlines()[0]})") from None
        model.config.backbone_path = meta["config"].get("backbone_path")
        own = model._saved_state(includes_backbone, include_decoder=includes_decoder)
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
