"""The training loop: one process or torchrun (DDP / FSDP), exact resume, logging.

    trainer = Trainer(TrainConfig.from_file("train.toml"))
    trainer.run(resume=True)

* AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient accumulation
  and clipping, autocast (bf16/fp16) on GPU and bf16 on CPU when asked (train.cpu_amp), optional EMA of the trained weights;
* the paper's stages as configs (pyratok.train.config.STAGES);
* checkpoints ``out_dir/checkpoints/step-NNNNNNNN/`` = a loadable model folder
  (config.json + model.safetensors) + ``trainer.json`` / ``trainer.safetensors`` (optimizer,
  scheduler, EMA, RNG, step, data position; no pickle, see state_io.py), written to a
  temporary folder and renamed (atomic; a re-saved step is swapped in crash-safely), every
  ``checkpoint_every`` steps, at the end, and on SIGTERM/SIGINT (DataLoader workers ignore
  those, so a signal to the whole process group is handled once); ``latest`` names the
  newest, and resume falls back to the newest complete checkpoint if it is incomplete; with
  ``train.ema`` > 0 each checkpoint also holds ``ema/``, the model folder with the EMA of the
  trained weights in their place (the weights to use; the raw ones are kept for resuming);
* a non-finite loss or gradient norm stops the run (NonFiniteLossError) without saving;
* resume is exact: data order and masks depend only on (seed, step), and the optimizer,
  scheduler and RNG states are restored, so a killed and resumed run reaches the weights of
  an uninterrupted one;
* logs: ``out_dir/log.jsonl`` (every term, PSNR, codebook usage per level, tokens/s, lr),
  TensorBoard when the tensorboard package is installed, a tqdm bar on rank 0;
* distributed entropy statistics are all-reduced (the process group goes to the loss).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import time
import warnings
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.distributed as dist

from pyratok import ops
from pyratok.data import ClipConfig, NoUsableClipError, VideoClipDataset, collate_clips
from pyratok.metrics import psnr
from pyratok.models.masking import VideoMasking
from pyratok.models.pyratok import DECODER_PREFIXES, PyraTok, PyraTokConfig
from pyratok.train.config import STAGES, TrainConfig
from pyratok.train.state_io import StateFileError, load_state, save_state
from pyratok.utils import atomic_write, error_summary

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer"            # trainer.json + trainer.safetensors (no pickle)
EMA_MODEL = "ema"                    # with train.ema > 0: step-N/ema/ = the model with the EMA weights
LEGACY_TRAINER_STATE = "trainer.pt"  # older checkpoints; read with weights_only=True


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _world() -> int:
    return dist.get_world_size() if _is_dist() else 1


def setup_distributed() -> torch.device:
    """Initialises torch.distributed under torchrun (WORLD_SIZE > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _is_dist():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _check_writable(folder: str, name: str) -> None:
    """Creates ``folder`` and writes a probe file in it, so that a read-only or impossible
    output folder fails before the first step rather than at the first checkpoint."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise ValueError(f"{name}: cannot create or write {folder} ({err.strerror or err})") from None


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """SIGTERM / SIGINT sent to the whole process group (schedulers, Ctrl-C) must reach only
    the main process, which finishes its step, saves a checkpoint and shuts the workers down;
    a worker killed by it would make the DataLoader raise instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf: the run stops without saving that state."""


class ResumableSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded over ranks, that can start mid-epoch."""

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world: int = 1):
        self.size, self.seed, self.epoch, self.start, self.rank, self.world = size, seed, epoch, start, rank, world

    def _order(self) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        per_rank = math.ceil(self.size / self.world)
        order = (order * math.ceil(per_rank * self.world / self.size))[: per_rank * self.world]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self._order()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.start)


def parameter_group(name: str) -> Optional[str]:
    """The trainable group (pyratok.train.config.STAGES) a PyraTok parameter belongs to; None for
    the frozen text encoder, drift teacher and LPIPS network, which no stage trains."""
    if name.startswith(("text_encoder.", "drift_teacher.", "lpips.")):
        return None
    if ".lora_" in name:
        return "lora"
    if name.startswith(DECODER_PREFIXES):
        return "decoder"
    if name.startswith("vae."):
        return "encoder"
    return name.split(".")[0]                  # lapq, null_text, prior, drift_head


def build_model(cfg: TrainConfig) -> PyraTok:
    """The model of a training run, with the stage's complete loss weights and trainable groups
    (nothing is inherited from the config of a checkpoint it starts from)."""
    if cfg.model.pretrained:
        model = PyraTok.from_pretrained(cfg.model.pretrained)
    else:
        overrides = {}
        if cfg.model.text_encoder:
            overrides["text_encoder"] = None if cfg.model.text_encoder == "none" else cfg.model.text_encoder
        if cfg.model.backbone_path:
            overrides["backbone_path"] = cfg.model.backbone_path
        preset = PyraTokConfig.tiny if cfg.model.preset == "tiny" else PyraTokConfig.paper
        model = PyraTok(preset(**overrides))
    if cfg.model.lpips:
        model.load_lpips(cfg.model.lpips)
    model.config.loss = cfg.loss_config()
    groups = set(STAGES[cfg.train.stage]["train"])
    if "backbone" in groups:
        groups |= {"encoder", "decoder"}
    if cfg.train.train_decoder:
        groups.add("decoder")
    if cfg.train.train_encoder:
        groups.add("encoder")
    if model.config.loss.ar == 0:
        groups.discard("prior")                # nothing would reach it
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(parameter_group(name) in groups)
    return model


class Trainer:
    def __init__(self, config: TrainConfig, device: Optional[torch.device] = None):
        self.cfg = config
        self.device = device or setup_distributed()
        torch.manual_seed(config.train.seed)
        self.model = build_model(config).to(self.device)
        t = config.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = [p.detach().clone() for p in self.params] if t.ema > 0 else None
        d = config.data
        self.dataset = VideoClipDataset(d.source, ClipConfig(num_frames=d.num_frames, height=d.height, width=d.width,
                                                             fps=d.fps or None, crop=d.crop, seed=t.seed, resize=d.resize,
                                                             buckets=[tuple(b) for b in d.buckets] or None))
        self.backbone_stage = "backbone" in STAGES[t.stage]["train"]
        self.masking = VideoMasking(self.model.config.masking) if t.masking and not self.backbone_stage else None
        self.step = 0
        self.batches_seen = 0
        self.wrapped = self._wrap(self.model)
        self._stop_signal: Optional[int] = None
        self.log_path = os.path.join(t.out_dir, "log.jsonl")
        self._tb = None

    # -- pieces --------------------------------------------------------------------------

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup:
            return (step + 1) / t.warmup
        progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _fsdp(self) -> bool:
        return _is_dist() and self.cfg.train.distributed == "fsdp"

    def _wrap(self, model):
        if not _is_dist():
            return model
        if self.cfg.train.distributed == "fsdp":
            if self.device.type == "cpu":
                raise ValueError("train.distributed='fsdp' needs GPUs (PyTorch's FSDP has no CPU backend); "
                                 "use distributed='ddp' on CPU")
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP(model, use_orig_params=True, device_id=self.device if self.device.type == "cuda" else None)
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=True)

    def _loader(self, epoch: int, start: int):
        self.dataset.set_epoch(epoch)
        sampler = ResumableSampler(len(self.dataset), self.cfg.train.seed, epoch, start, _rank(), _world())
        # The loader's own generator: an iterator otherwise draws its base seed from the global
        # RNG, which a resume restores at a different point of the epoch than the first run.
        generator = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.train.batch_size, sampler=sampler,
                                           num_workers=self.cfg.data.num_workers, collate_fn=collate_clips,
                                           persistent_workers=False, drop_last=False, generator=generator,
                                           worker_init_fn=_worker_ignores_stop_signals)

    def _batches(self):
        """Batches from the current data position on, across epochs."""
        per_epoch = math.ceil(math.ceil(len(self.dataset) / _world()) / self.cfg.train.batch_size)
        while True:
            epoch, pos = divmod(self.batches_seen, per_epoch)
            before = self.batches_seen
            for batch in self._loader(epoch, pos * self.cfg.train.batch_size):
                self.batches_seen += 1
                yield batch
            if self.batches_seen == before:   # pos < per_epoch always leaves a batch: this would loop forever
                raise RuntimeError(f"no batch at epoch {epoch}, position {pos} of {per_epoch} batches per epoch "
                                   f"({len(self.dataset)} clips, batch size {self.cfg.train.batch_size})")

    def _autocast(self):
        amp = self.cfg.train.amp
        if self.device.type == "cpu" and self.cfg.train.cpu_amp == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.device.type != "cuda" or amp == "none":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_dir(self) -> str:
        return os.path.join(self.cfg.train.out_dir, CHECKPOINTS)

    def _full_states(self):
        """(model state, optimizer state) for the checkpoint.  Under FSDP the shards are gathered
        into full, unsharded tensors on the CPU (a collective: every rank calls it)."""
        if not self._fsdp():
            return None, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.wrapped, options=options),
                get_optimizer_state_dict(self.wrapped, self.optimizer, options=options))

    def _scheduler_state(self) -> dict:
        """LambdaLR's state without its lr_lambdas entries: the factor is this trainer's own method
        (code, rebuilt from the config on resume), and LambdaLR stores a copy of the ``__dict__`` of
        any lambda that is not a plain function, which for a bound method (or a wrapped one, as under
        mutation testing) is the function's attributes, not state.  None is what LambdaLR writes for
        a plain function and skips on load."""
        state = self.scheduler.state_dict()
        return {**state, "lr_lambdas": [None] * len(state["lr_lambdas"])}

    def _trainer_state(self, optimizer_state) -> dict:
        return {"step": self.step, "batches_seen": self.batches_seen,
                "optimizer": optimizer_state, "scheduler": self._scheduler_state(),
                "ema": self.ema, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate(), "config": self.cfg.to_dict()}

    def _save_ema_model(self, path: str) -> None:
        """The model with the EMA of the trained weights in place of the trained weights: a loadable
        model folder (the weights to use after training; the raw ones stay for resuming)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        state = self.model.state_dict()
        state.update({names[id(p)]: e for p, e in zip(self.params, self.ema)})
        self.model.save_pretrained(path, state_dict=state)

    def save_checkpoint(self) -> Optional[str]:
        """Writes ``step-N`` through a temporary folder.  Re-saving an existing step never leaves
        a moment without a complete copy: the old folder is renamed aside, the new one renamed
        in, ``latest`` updated, and only then the old one deleted (``latest_checkpoint`` falls
        back to the aside copy if a kill lands between the renames)."""
        if _is_dist():
            dist.barrier()
        model_state, optimizer_state = self._full_states()
        path = None
        if _rank() == 0:
            root = self.checkpoint_dir()
            name = f"step-{self.step:08d}"
            path = os.path.join(root, name)
            tmp, old = os.path.join(root, f".tmp-{name}"), os.path.join(root, f".old-{name}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, state_dict=model_state)
            save_state(tmp, TRAINER_STATE, self._trainer_state(optimizer_state))
            if self.ema is not None and not self._fsdp():
                self._save_ema_model(os.path.join(tmp, EMA_MODEL))
            replaced = os.path.isdir(path)
            if replaced:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            with atomic_write(os.path.join(root, "latest"), "w") as f:
                f.write(name)
            if replaced:
                shutil.rmtree(old, ignore_errors=True)
        if _is_dist():
            dist.barrier()
        return path

    @staticmethod
    def is_complete_checkpoint(path: str) -> bool:
        """Every file a resume reads is there and non-empty (contents are checked on load)."""
        state = [TRAINER_STATE + ".json", TRAINER_STATE + ".safetensors"]
        if not os.path.isfile(os.path.join(path, state[0])):
            state = [LEGACY_TRAINER_STATE]
        return all(os.path.isfile(os.path.join(path, f)) and os.path.getsize(os.path.join(path, f)) > 0
                   for f in ["config.json", "model.safetensors", *state])

    def latest_checkpoint(self) -> Optional[str]:
        """The checkpoint ``latest`` names if it is complete; otherwise (a kill during a save)
        the newest complete ``step-N`` (or its renamed-aside copy ``.old-step-N``)."""
        root = self.checkpoint_dir()
        pointer = os.path.join(root, "latest")
        named = None
        if os.path.isfile(pointer):
            with open(pointer, errors="replace") as f:
                named = os.path.join(root, f.read(256).strip())
            if re.fullmatch(r"step-\d+", os.path.basename(named)) and self.is_complete_checkpoint(named):
                return named
        candidates = []
        for entry in os.listdir(root) if os.path.isdir(root) else ():
            m = re.fullmatch(r"(\.old-)?step-(\d+)", entry)
            if m and self.is_complete_checkpoint(os.path.join(root, entry)):
                candidates.append((int(m.group(2)), m.group(1) is None, entry))
        if not candidates:
            return None
        best = os.path.join(root, max(candidates)[2])
        if named is not None:
            warnings.warn(f"{pointer} names {named}, which is incomplete; using {best}", stacklevel=2)
        return best

    def _read_trainer_state(self, path: str) -> dict:
        if os.path.isfile(os.path.join(path, TRAINER_STATE + ".json")):
            state = load_state(path, TRAINER_STATE)
        else:  # checkpoints written before trainer.json: tensors and plain containers only
            legacy = os.path.join(path, LEGACY_TRAINER_STATE)
            try:
                state = torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as err:  # UnpicklingError for anything beyond tensors and containers
                raise StateFileError(f"{legacy}: not a loadable trainer state; only tensors, numbers and "
                                     f"containers are read, never other objects "
                                     f"({error_summary(err)})") from None
        where = os.path.join(path, TRAINER_STATE + ".json")
        expected = {"step": int, "batches_seen": int, "optimizer": dict, "scheduler": dict,
                    "torch_rng": torch.Tensor, "python_rng": tuple}
        for key, kind in expected.items():
            if not isinstance(state.get(key), kind) or (kind is int and state[key] < 0):
                raise StateFileError(f"{where}: {key!r} missing or not a {kind.__name__}")
        ema = state.get("ema")
        if ema is not None and (not isinstance(ema, list) or len(ema) != len(self.params)
                                or any(not isinstance(e, torch.Tensor) or e.shape != p.shape
                                       for e, p in zip(ema, self.params))):
            raise StateFileError(f"{where}: 'ema' does not match the {len(self.params)} trained parameters")
        if (ema is None) != (self.ema is None):
            raise StateFileError(f"{where}: the checkpoint was written with train.ema "
                                 f"{'off' if ema is None else 'on'}; the config has it "
                                 f"{'off' if self.ema is None else 'on'}")
        return state

    def load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_file

        state = self._read_trainer_state(path)
        try:
            weights = load_file(os.path.join(path, "model.safetensors"))
        except Exception as err:
            raise StateFileError(f"{path}/model.safetensors: truncated or corrupted "
                                 f"({type(err).__name__}: {err})") from None
        own = set(self.model._saved_state(include_backbone=True))
        missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        try:
            if self._fsdp():  # every rank reads the full files and keeps its own shards
                from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                     set_optimizer_state_dict)

                options = StateDictOptions(full_state_dict=True, strict=False)
                set_model_state_dict(self.wrapped, weights, options=options)
                set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"], options=options)
            else:
                self.model.load_state_dict(weights, strict=False)
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            random.setstate(state["python_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise StateFileError(f"{path}: the trainer state does not fit this run "
                                 f"({error_summary(err)})") from None
        if state.get("ema") is not None:
            self.ema = [e.to(p.device, p.dtype) for e, p in zip(state["ema"], self.params)]
        self.step, self.batches_seen = state["step"], state["batches_seen"]

    # -- logging -----------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if _rank() != 0:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.cfg.train.out_dir, "tensorboard"))
            except ImportError:
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    # -- the loop ----------------------------------------------------------------------------

    def _check_finite(self, values: dict, what: str, last_good: Optional[str]) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise NonFiniteLossError(f"step {self.step + 1}: non-finite {what} "
                                     f"({', '.join(f'{k}={v}' for k, v in bad.items())}); stopped without "
                                     f"saving this state; {kept} (lower train.lr or check the data)")

    def _check_data(self) -> None:
        """One clip is read before the first step, so that a source without a usable video is a
        clear error rather than a failure inside a DataLoader worker."""
        try:
            self.dataset[self.batches_seen * self.cfg.train.batch_size % len(self.dataset)]
        except NoUsableClipError as err:
            raise ValueError(f"data.source={self.cfg.data.source}: {err}") from None

    def _handle_signal(self, signum, frame):
        self._stop_signal = signum

    def run(self, resume: bool = False, on_step: Optional[Callable[["Trainer"], None]] = None) -> dict:
        """Trains to ``train.steps``; returns the last log record.  ``on_step`` is called after
        every optimizer step (tests use it to interrupt a run)."""
        t = self.cfg.train
        _check_writable(self.checkpoint_dir(), "train.out_dir")
        if resume:
            latest = self.latest_checkpoint()
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoint_dir()}")
            self.load_checkpoint(latest)
        self._check_data()
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        pg = dist.group.WORLD if _is_dist() else None
        bar = None
        if t.progress and _rank() == 0:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc=f"stage {t.stage}", dynamic_ncols=True)
        record: dict = {}
        batches = self._batches()
        last_good = self.latest_checkpoint() if _rank() == 0 else None
        try:
            self.model.train()
            while self.step < t.steps and self._stop_signal is None:
                start = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                usage, quality, tokens = [], [], 0
                for micro in range(t.grad_accum):
                    batch = next(batches)
                    video = batch["video"].to(self.device, non_blocking=True)
                    captions = batch["caption"]
                    text = captions if (self.model.text_encoder is not None and any(captions)) else None
                    masked = None
                    if self.masking is not None and self.model.training:   # a training-time transform only
                        g = torch.Generator().manual_seed(t.seed * 1_000_003 + self.step * 97 + micro)
                        masked, _ = self.masking(video, g)
                    with self._autocast():
                        if self.backbone_stage:
                            recon, losses = self.model.backbone_forward(video)
                        else:
                            recon, losses = self.wrapped(video, text, masked, pg, self.step)
                    scalars = losses.scalars()
                    self._check_finite(scalars, "loss", last_good)
                    (losses.total / t.grad_accum).backward()
                    for k, v in scalars.items():
                        sums[k] = sums.get(k, 0.0) + v / t.grad_accum
                    quality.append(psnr(recon.detach().float(), video).item())
                    if losses.indices is not None:
                        usage.append([ops.codebook_usage(i, self.model.num_bits).fraction_used.item()
                                      for i in losses.indices])
                        tokens += sum(i.numel() for i in losses.indices)
                    else:
                        tokens += video[:, 0].numel()  # pixels per second in the backbone stage
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.clip_grad) if t.clip_grad > 0 else None
                if grad_norm is not None:
                    self._check_finite({"grad_norm": float(grad_norm)}, "gradient", last_good)
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    with torch.no_grad():
                        for e, p in zip(self.ema, self.params):
                            e.lerp_(p.detach(), 1 - t.ema)
                self.step += 1
                seconds = time.perf_counter() - start
                record = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], **sums,
                          "psnr": sum(quality) / len(quality),
                          **{f"usage_l{l}": sum(u[l] for u in usage) / len(usage)
                             for l in range(len(usage[0]) if usage else 0)},
                          "tokens_per_s": tokens * _world() / seconds, "seconds": seconds}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['total']:.3f}", psnr=f"{record['psnr']:.2f}",
                                    usage="/".join(f"{record[f'usage_l{l}']:.2f}"
                                                   for l in range(len(usage[0]) if usage else 0)),
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                if on_step is not None:
                    on_step(self)
                if self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    last_good = self.save_checkpoint()
            self.save_checkpoint()
        finally:
            batches.close()  # shuts the DataLoader workers down before the process exits
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if self._tb:
                self._tb.flush()
        return record

    @property
    def stopped_by_signal(self) -> Optional[int]:
        return self._stop_signal
