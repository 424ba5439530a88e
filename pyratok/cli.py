"""The `pyratok` command line: encode, tokenize, decode, reconstruct, train, eval, info.

Every command has --help.  A user mistake (missing file, not a video, bad option, tokens
from another model, ...) prints one line ``pyratok: error: ...`` and exits with status 2;
nothing is written in that case.  Without --model the bundled default model is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

# OpenMP threads that finish a parallel region early spin-wait for the others by default.  When
# another process keeps the cores busy, a descheduled thread makes every region wait for a
# time slice: encode + decode of a 5-frame 64x64 clip with the bundled model took 5.5 s instead
# of 0.24 s with passive waiting (2 cores, load ~8).  libgomp reads the policy when torch loads
# it, so it is set here, before any torch import (pyratok/__init__.py imports nothing heavy);
# an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pyratok.pretrained import RATES
from pyratok.utils import MAX_FRAMES, MAX_SIDE, MAX_TILE, check_clip_pixels, error_summary

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a reader closing the pipe early gives other tools


class UserError(Exception):
    """A mistake in the command's input: reported in one line, no traceback."""


# -- shared helpers ---------------------------------------------------------------------------


def _check_device(text: str) -> str:
    """--device must name a device this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text!r}: not a torch device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {text}: this machine (or this torch build) has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {text}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {text}: expected cpu, cuda, cuda:N or mps")
    return text


def _load_model(path: Optional[str], device: str, rate: Optional[str] = None):
    from pyratok.models.pyratok import PyraTok
    from pyratok.pretrained import default_model_path

    _check_device(device)
    if path and rate:
        raise UserError(f"--rate {rate}: chooses an operating point of the bundled model; it cannot be "
                        f"combined with --model {path}")
    path = path or default_model_path(rate or "low")
    if not os.path.isdir(path):
        raise UserError(f"--model: no such model folder: {path}")
    model = PyraTok.from_pretrained(path, device=device, inference=True)  # no peft/transformers import
    return model.eval()


def _load_lpips(model, path: Optional[str]) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise UserError(f"--lpips {path}: no such file")
    try:
        model.load_lpips(path)
    except Exception as err:  # torch.load / state-dict mismatches raise several types
        raise UserError(f"--lpips {path}: not an LPIPS (VGG) weights file "
                        f"({error_summary(err, 160)})") from None


def _parse_size(text: Optional[str]):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 128x128") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise UserError(f"--size {text}: height and width must be positive multiples of 8")
    if max(h, w) > MAX_SIDE:
        raise UserError(f"--size {text}: at most {MAX_SIDE} pixels a side")
    return h, w


AUTO_TILE = 64


def _tile(text: str, model, height: int, width: int) -> Optional[int]:
    """--tile -> the tile size in latent pixels for a frame of height x width pixels, or None."""
    if text == "none":
        return None
    if text == "auto":
        sf = model.vae.spatial_factor
        return AUTO_TILE if max(height, width) > AUTO_TILE * sf else None
    try:
        tile = int(text)
    except ValueError:
        raise UserError(f"--tile {text!r}: expected a number of latent pixels, 'auto' or 'none'") from None
    if not 8 <= tile <= MAX_TILE:
        raise UserError(f"--tile {tile}: expected at least 8 and at most {MAX_TILE} latent pixels")
    return tile


def _check_frames(frames: Optional[int]) -> None:
    if frames is not None and (frames < 1 or (frames - 1) % 4):
        raise UserError(f"--frames {frames}: the tokenizer takes 1 + 4k frames (1, 5, 9, 17, 33, ...)")
    if frames is not None and frames > MAX_FRAMES:
        raise UserError(f"--frames {frames}: at most {MAX_FRAMES} frames per clip")


def load_clip(path: str, frames: Optional[int], size):
    """A video file -> ((1, 3, T, H, W) in [-1, 1], fps): T = 1+4k (the longest that fits, or
    ``frames``), centre-cropped to multiples of 8 or resized+cropped to ``size``."""
    from pyratok.data import resize_and_crop
    from pyratok.data.dataset import resized_size
    from pyratok.data.video import open_video, read_frames

    try:
        reader = open_video(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except ValueError:
        raise UserError(f"{path}: not a readable video") from None
    total = len(reader)
    if total < 1:
        raise UserError(f"{path}: the video has no frames")
    if frames is None:
        frames = min(1 + 4 * ((total - 1) // 4), MAX_FRAMES)
    _check_frames(frames)
    if frames > total:
        raise UserError(f"--frames {frames}: {path} has only {total} frames")
    H, W = _frame_size(reader, path)
    try:  # the decoded source and the resized clip are bounded before either is allocated
        check_clip_pixels(frames, H, W, f"{path} (decoded)")
        if size is not None:
            check_clip_pixels(frames, *resized_size(H, W, *size), f"{path} resized to cover --size {size[0]}x{size[1]}")
    except ValueError as err:
        raise UserError(str(err)) from None
    if size is None:
        size = (H - H % 8, W - W % 8)
        if min(size) == 0:
            raise UserError(f"{path}: frames of {H}x{W} are smaller than 8x8")
    video = read_frames(reader, range(frames), path)                       # (T, H, W, 3)
    clip = resize_and_crop(video, size[0], size[1], None)[None]             # (1, 3, T, h, w)
    return clip, float(reader.get_avg_fps()) or 25.0


def _frame_size(reader, path: str) -> tuple[int, int]:
    """(height, width) of a video's frames from the container header, without decoding."""
    from pyratok.data.video import read_frames

    try:
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.height > 0 and stream.width > 0:
                return stream.height, stream.width
    except Exception:  # PyAV cannot parse what decord opened: decode one frame instead
        pass
    return tuple(read_frames(reader, [0], path).shape[1:3])


def _to_uint8(video):
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    import torch

    return ((video.clamp(-1, 1) + 1) * 127.5).round().to("cpu", dtype=torch.uint8).permute(1, 2, 3, 0)


def _text_arg(model, text: Optional[str]):
    if text and model.text_encoder is None:
        raise UserError("--text: this model has no text encoder (it was built with text_encoder=None)")
    return text or None


def _progress(items, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=quiet, dynamic_ncols=True)


# -- commands ---------------------------------------------------------------------------------


def _encode_outputs(videos: list[str], output: str) -> list[str]:
    """The token file of each video: ``output`` itself for one video, else ``output/<stem>.safetensors``;
    two videos that would write one file are refused."""
    folder = len(videos) > 1 or output.endswith(os.sep) or os.path.isdir(output)
    if len(videos) > 1 and output.endswith(".safetensors") and not os.path.isdir(output):
        raise UserError(f"-o {output}: {len(videos)} videos need an output folder (e.g. -o tokens/), "
                        "not a token file name")
    if not folder:
        if not output.endswith(".safetensors"):
            raise UserError(f"-o {output}: name the token file *.safetensors (or give a folder for several videos)")
        return [output]
    outputs, first = [], {}
    for video in videos:
        out = os.path.join(output, os.path.splitext(os.path.basename(video))[0] + ".safetensors")
        if out in first:
            raise UserError(f"{first[out]} and {video} would both be written to {out}; encode them into separate "
                            "folders or rename one")
        first[out] = video
        outputs.append(out)
    return outputs


def cmd_encode(args) -> int:
    import torch

    from pyratok.io import save_tokens

    size = _parse_size(args.size)
    _check_frames(args.frames)
    outputs = _encode_outputs(args.videos, args.output)
    if not args.overwrite:
        existing = [o for o in outputs if os.path.exists(o)]
        if existing:
            raise UserError(f"{existing[0]} exists" + (f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else "")
                            + "; pass --overwrite to replace it")
    from pyratok.data.video import open_video

    for v in args.videos:  # every input is checked before any work starts
        try:
            open_video(v)
        except FileNotFoundError:
            raise UserError(f"{v}: no such file") from None
        except ValueError:
            raise UserError(f"{v}: not a readable video") from None
    model = _load_model(args.model, args.device, args.rate)
    _tile(args.tile, model, 0, 0)  # a bad --tile fails before any work
    text = _text_arg(model, args.text)
    for path, out in _progress(list(zip(args.videos, outputs)), "encode", args.quiet):
        clip, fps = load_clip(path, args.frames, size)
        with torch.no_grad():
            tokens = model.encode(clip.to(args.device), text, tile=_tile(args.tile, model, *clip.shape[-2:]))
        tokens.source.update({"fps": fps, "path": os.path.abspath(path)})
        save_tokens(out, tokens.to("cpu"))
        if args.quiet:
            continue
        print(f"{path} -> {out}: {tokens.num_tokens} tokens, K={tokens.num_bits}, "
              f"grids {tokens.grids}, {tokens.bits_per_pixel():.4f} bits/pixel")
    return 0


def _torchrun_group() -> bool:
    """Joins the torchrun process group (gloo: only barriers travel) when launched by torchrun
    with several ranks; True when this call created it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ or not dist.is_available() \
            or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def cmd_tokenize(args) -> int:
    from pyratok.tokenize import ClipOptions, tokenize

    size = _parse_size(args.size)
    _check_frames(args.frames)
    for flag, value, least in (("--stride", args.stride, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", args.workers, 0), ("--videos-per-shard", args.videos_per_shard, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: expected at least {least}")
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps {args.fps}: expected a positive frame rate")
    if not os.path.exists(args.source):
        raise UserError(f"{args.source}: no such folder or manifest")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"-o {args.output}: exists and is not a folder")
    options = ClipOptions(args.frames, args.stride, size, args.fps)
    model = _load_model(args.model, args.device, args.rate)
    _tile(args.tile, model, 0, 0)  # a bad --tile fails before any work
    created = _torchrun_group()
    try:
        result = tokenize(args.source, args.output, model, options, batch_size=args.batch_size, workers=args.workers,
                          videos_per_shard=args.videos_per_shard, tile=lambda h, w: _tile(args.tile, model, h, w),
                          device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    if args.quiet:
        return 0
    from pyratok.io.shards import rank_and_world

    rank, world = rank_and_world()
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{who}{result.clips} clips, {result.tokens} tokens in {result.shards_written} new shards "
          f"({result.shards_done_before} done before), {result.videos_skipped} videos skipped, "
          f"{result.clips_per_second:.1f} clips/s, {result.bits_per_pixel:.4f} bits/pixel")
    if result.index:
        _print_dataset(os.path.dirname(result.index))
    elif world > 1:
        print(f"{who}other ranks are still running; the last to finish writes {os.path.join(args.output, 'index.json')}")
    return 0


def _print_dataset(path: str, as_json: bool = False) -> None:
    from pyratok.io.shards import ERRORS_FILE, read_index, summarize

    folder, index = read_index(path)
    totals = summarize(index)
    if as_json:
        print(json.dumps(dict({k: v for k, v in index.items() if k != "shards"}, num_shards=totals.shards), indent=2))
        return
    clip = index.get("clip", {})
    print(f"dataset     {folder}")
    print(f"format      {index['format']} v{index['format_version']} (WebDataset tar shards)")
    print(f"model       {index.get('model_id')}")
    print(f"clips       {totals.clips} in {totals.shards} shards, {totals.bytes / 2**20:.2f} MiB; "
          f"{clip.get('frames')} frames every {clip.get('stride')}, size "
          f"{'x'.join(map(str, clip['size'])) if clip.get('size') else 'own'}"
          + (f" at {clip['fps']:g} fps" if clip.get("fps") else ""))
    print(f"tokens      {totals.tokens} of K={totals.num_bits} bits in {index.get('levels')} levels")
    print(f"bits/pixel  {totals.bits_per_pixel:.4f}")
    print(f"videos      {totals.videos}, {totals.videos_skipped} skipped"
          + (f" (reasons in {os.path.join(folder, ERRORS_FILE)})" if totals.videos_skipped else ""))


def cmd_decode(args) -> int:
    import torch

    from pyratok.data import write_video
    from pyratok.io import TokenFileError, load_tokens

    try:
        tokens = load_tokens(args.tokens)
    except TokenFileError as err:
        raise UserError(str(err)) from None
    model = _load_model(args.model, args.device, args.rate)
    try:
        model.check_tokens(tokens)
    except ValueError as err:
        raise UserError(f"{args.tokens}: {err}") from None
    src = tokens.source
    lt, lh, lw = tokens.latent_grid
    try:  # the video the tokens decode to is bounded before the decoder allocates it
        check_clip_pixels(1 + (lt - 1) * model.vae.temporal_factor, lh * model.vae.spatial_factor,
                          lw * model.vae.spatial_factor, f"{args.tokens} decodes to")
    except ValueError as err:
        raise UserError(str(err)) from None
    tile = _tile(args.tile, model, lh * model.vae.spatial_factor, lw * model.vae.spatial_factor)
    with torch.no_grad():
        video = model.decode(tokens, tile=tile)[0]
    write_video(args.output, _to_uint8(video), fps=tokens.source.get("fps", 25.0))
    if not args.quiet:
        print(f"{args.tokens} -> {args.output}: {video.shape[1]} frames of {video.shape[2]}x{video.shape[3]}")
    return 0


def _frame_grid(videos, path: str, max_frames: int = 6) -> None:
    """PNG: one row per video ((3, T, H, W) each: the original first, then reconstructions), up
    to ``max_frames`` frames evenly spaced over the clip."""
    import torch
    from PIL import Image

    T = videos[0].shape[1]
    picks = sorted({round(i * (T - 1) / max(1, min(max_frames, T) - 1)) for i in range(min(max_frames, T))})
    rows = [torch.cat([_to_uint8(v)[t] for t in picks], dim=1) for v in videos]
    from pyratok.utils import atomic_write

    with atomic_write(path) as f:
        Image.fromarray(torch.cat(rows, dim=0).numpy()).save(f, format="PNG")


def reconstruct_clip(model, clip, text=None, tile: Optional[int] = None, tokens=None) -> dict:
    """Encode + decode one clip (``tokens``: the clip's tokens, already encoded); returns the
    reconstruction, tokens and metrics."""
    import torch

    from pyratok import ops
    from pyratok.metrics import psnr, ssim

    with torch.no_grad():
        if tokens is None:
            tokens = model.encode(clip, text, tile=tile)
        recon = model.decode(tokens, tile=tile)
    metrics = {
        "psnr": psnr(recon, clip).item(), "ssim": ssim(recon, clip).item(),
        "bits_per_pixel": tokens.bits_per_pixel(), "tokens": tokens.num_tokens, "num_bits": tokens.num_bits,
        "grids": [list(g) for g in tokens.grids],
        "codebook_usage": [ops.codebook_usage(i, tokens.num_bits).fraction_used.item() for i in tokens.ids],
    }
    if model.lpips is not None:
        with torch.no_grad():
            metrics["lpips"] = model.lpips(recon, clip).item()
    return {"recon": recon, "tokens": tokens, "metrics": metrics}


def write_reconstruction(folder: str, original, recon, fps: float) -> None:
    """reconstruction.mp4, side_by_side.mp4 and frames.png of one clip ((3, T, H, W) each) in folder."""
    import torch

    from pyratok.data import write_video

    os.makedirs(folder, exist_ok=True)
    write_video(os.path.join(folder, "reconstruction.mp4"), _to_uint8(recon), fps=fps)
    side = torch.cat([original, recon], dim=3)                                    # (3, T, H, 2W)
    write_video(os.path.join(folder, "side_by_side.mp4"), _to_uint8(side), fps=fps)
    _frame_grid([original, recon], os.path.join(folder, "frames.png"))


def cmd_reconstruct(args) -> int:
    from pyratok.utils import atomic_write

    size = _parse_size(args.size)
    _check_frames(args.frames)
    if not os.path.isfile(args.video):
        raise UserError(f"{args.video}: no such file")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"-o {args.output}: exists and is not a folder (reconstruct writes a folder of outputs)")
    model = _load_model(args.model, args.device, args.rate)
    _load_lpips(model, args.lpips)
    text = _text_arg(model, args.text)
    _tile(args.tile, model, 0, 0)  # a bad --tile fails before any work
    clip, fps = load_clip(args.video, args.frames, size)
    result = reconstruct_clip(model, clip.to(args.device), text, _tile(args.tile, model, *clip.shape[-2:]))
    write_reconstruction(args.output, clip[0], result["recon"][0].cpu(), fps)
    metrics = {"video": os.path.abspath(args.video), "frames": clip.shape[2], "height": clip.shape[3],
               "width": clip.shape[4], "model_id": model.model_id, **result["metrics"]}
    with atomic_write(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if not args.quiet:
        m = result["metrics"]
        print(f"{args.video}: {clip.shape[2]} frames {clip.shape[3]}x{clip.shape[4]} -> {m['tokens']} tokens "
              f"({m['bits_per_pixel']:.4f} bits/pixel)")
        print(f"PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}" + (f"  LPIPS {m['lpips']:.4f}" if "lpips" in m else ""))
        print(f"codebook usage per level: {', '.join(f'{u:.4f}' for u in m['codebook_usage'])}")
        print(f"outputs in {args.output}: reconstruction.mp4, side_by_side.mp4, frames.png, metrics.json")
    return 0


def cmd_train(args) -> int:
    from pyratok.train import Trainer, TrainConfig

    try:
        config = TrainConfig.from_file(args.config)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    if args.lpips:
        config.model.lpips = os.path.abspath(args.lpips)
    root = os.path.join(config.train.out_dir, "checkpoints")
    if args.resume and not any(name.startswith(("step-", ".old-step-")) for name in
                               (os.listdir(root) if os.path.isdir(root) else ())):
        raise UserError(f"--resume: no checkpoint under {root}")
    trainer = Trainer(config)
    record = trainer.run(resume=args.resume)
    if trainer.stopped_by_signal is not None:
        print(f"stopped by signal {trainer.stopped_by_signal} at step {trainer.step}; "
              f"checkpoint saved, continue with --resume", file=sys.stderr)
        return 128 + trainer.stopped_by_signal
    if not args.quiet and record:
        print(json.dumps(record))
    return 0


def cmd_eval(args) -> int:
    """Each readable video is evaluated once; an unreadable one (missing, not a video, too
    short) is listed with its reason and left out of the means."""
    from pyratok.data import ClipConfig, VideoClipDataset
    from pyratok.utils import atomic_write

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected at least 1 video")
    _check_frames(args.frames)
    size = _parse_size(args.size) or (128, 128)
    try:
        check_clip_pixels(args.frames, size[0], size[1], "--frames x --size")
        dataset = VideoClipDataset(args.data, ClipConfig(num_frames=args.frames, height=size[0], width=size[1],
                                                         crop="center", fps=args.fps, resize=args.resize))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"-o {args.output}: exists and is not a folder")
    model = _load_model(args.model, args.device, args.rate)
    _load_lpips(model, args.lpips)
    rows, unreadable = [], []
    for i in _progress(range(len(dataset)), "eval", args.quiet):
        if args.limit and len(rows) == args.limit:
            break
        try:
            item = dataset.load_item(i)
        except (FileNotFoundError, EOFError, ValueError) as err:
            unreadable.append({"path": dataset.items[i]["path"], "reason": str(err).splitlines()[0]})
            continue
        clip = item["video"][None].to(args.device)
        text = item["caption"] if (item["caption"] and model.text_encoder is not None and args.use_captions) else None
        rows.append({"path": item["path"], **reconstruct_clip(model, clip, text, _tile(args.tile, model, *size))["metrics"]})
    if not rows:
        first = unreadable[0] if unreadable else {"path": args.data, "reason": "no videos"}
        raise UserError(f"{args.data}: no readable videos ({len(unreadable)} unreadable; "
                        f"first: {first['path']}: {first['reason']})")
    keys = ["psnr", "ssim", "bits_per_pixel"] + (["lpips"] if "lpips" in rows[0] else [])
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    levels = len(rows[0]["codebook_usage"])
    summary["codebook_usage"] = [sum(r["codebook_usage"][l] for r in rows) / len(rows) for l in range(levels)]
    summary.update({"videos": len(rows), "unreadable": len(unreadable), "frames": args.frames,
                    "height": size[0], "width": size[1], "model_id": model.model_id})
    os.makedirs(args.output, exist_ok=True)
    with atomic_write(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "videos": rows, "unreadable": unreadable}, f, indent=2)
    _eval_plot(rows, os.path.join(args.output, "eval.png"))
    if not args.quiet:
        for bad in unreadable:
            print(f"unreadable: {bad['path']}: {bad['reason']}", file=sys.stderr)
        print(json.dumps(summary))
    return 0


def _eval_plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyratok.utils import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(range(len(rows)), [r["psnr"] for r in rows])
    axes[0].set_xlabel("video")
    axes[0].set_ylabel("PSNR (dB)")
    axes[0].set_title("reconstruction PSNR per video")
    usage = [[r["codebook_usage"][l] for r in rows] for l in range(len(rows[0]["codebook_usage"]))]
    axes[1].boxplot(usage)
    axes[1].set_xlabel("level")
    axes[1].set_ylabel("fraction of 2^K codes used")
    axes[1].set_title("codebook usage per level")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def cmd_info(args) -> int:
    from pyratok.io import ShardError, TokenFileError, read_token_metadata

    if os.path.isdir(args.tokens) or os.path.basename(args.tokens) == "index.json":
        try:
            if args.quiet:  # the index read and every shard checked against its sha256
                from pyratok.io.shards import read_index, read_samples

                folder, index = read_index(args.tokens)
                for shard in index["shards"]:
                    for _ in read_samples(os.path.join(folder, shard["file"]), shard["sha256"]):
                        pass
                return 0
            _print_dataset(args.tokens, args.json)
        except ShardError as err:
            raise UserError(str(err)) from None
        return 0
    try:
        meta = read_token_metadata(args.tokens)
    except TokenFileError as err:
        raise UserError(str(err)) from None
    if args.quiet:  # the file was read and checked: the exit status is the answer
        return 0
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    if not isinstance(meta.get("source"), dict):
        meta["source"] = {}
    src = meta["source"]
    print(f"file        {args.tokens}")
    print(f"format      {meta['format']} v{meta['format_version']}, bit order {meta['bit_order']}")
    print(f"model       {meta['model_id']}")
    print(f"tokens      {meta['num_tokens']} of K={meta['num_bits']} bits in {len(meta['grids'])} levels: "
          + ", ".join("x".join(map(str, g)) for g in meta["grids"]))
    print(f"latent      {'x'.join(map(str, meta['latent_grid']))}")
    if src:
        print(f"source      {src.get('frames')} frames {src.get('height')}x{src.get('width')}"
              + (f" at {src['fps']:.3g} fps" if "fps" in src else "") + (f" from {src['path']}" if "path" in src else ""))
        if all(k in src for k in ("frames", "height", "width")):
            print(f"bits/pixel  {meta['num_bits'] * meta['num_tokens'] / (src['frames'] * src['height'] * src['width']):.4f}")
    if meta.get("caption"):
        print(f"caption     {meta['caption']}")
    return 0


# -- argument parsing -------------------------------------------------------------------------


# description and examples of each subcommand's --help (applied in build_parser)
COMMAND_HELP = {
    "encode": ("Encode videos into pyramids of binary tokens (one self-describing .safetensors token file per "
               "video) with the bundled default model or a model folder.",
               ["pyratok encode clip.mp4 -o clip.safetensors",
                "pyratok encode a.mp4 b.mp4 -o tokens/ --frames 17 --size 128x128",
                "pyratok encode clip.mp4 -o clip.safetensors --model my_model/ --text 'a red car'"]),
    "tokenize": ("Tokenize a whole dataset (a folder of videos or a JSONL/CSV manifest with path, caption, start, "
                 "end) into WebDataset tar shards with an index: clips cut, decoded in worker processes, batched, "
                 "encoded (with their captions when the model has a text encoder); resumable, torchrun-ready.",
                 ["pyratok tokenize videos/ -o shards/ --frames 17 --size 256x256",
                  "pyratok tokenize train.jsonl -o shards/ --batch-size 16 --workers 4",
                  "torchrun --nproc_per_node 8 -m pyratok.cli tokenize train.jsonl -o shards/"]),
    "decode": ("Decode a token file back into a video (H.264 mp4); the model must be the one that made the "
               "tokens (checked through the model id in the file).",
               ["pyratok decode clip.safetensors -o clip.mp4",
                "pyratok decode clip.safetensors -o clip.mp4 --model my_model/ --tile none"]),
    "reconstruct": ("Encode and decode one video; writes the reconstruction, a side-by-side video, a PNG grid of "
                    "frames and metrics.json (PSNR, SSIM, bits per pixel, codebook usage).",
                    ["pyratok reconstruct clip.mp4 -o out/",
                     "pyratok reconstruct clip.mp4 -o out/ --frames 17 --size 144x176 --lpips vgg_lpips.pth"]),
    "train": ("Train a PyraTok model from a TOML config, in one process or under torchrun (DDP); checkpoints "
              "and logs go to the config's output folder.",
              ["pyratok train train.toml",
               "pyratok train train.toml --resume",
               "torchrun --nproc_per_node 4 -m pyratok.cli train train.toml"]),
    "eval": ("Reconstruction metrics over a folder of videos or a manifest (JSON lines with path and caption): "
             "PSNR, SSIM, LPIPS when weights are given, bits per pixel and codebook usage per level.",
             ["pyratok eval videos/ -o eval/",
              "pyratok eval manifest.jsonl -o eval/ --frames 17 --size 128x128 --limit 100 --use-captions"]),
    "info": ("Describe a token file (format, model id, levels and grids, source size, bits per pixel, caption) "
             "or a tokenized shard folder (clips, tokens, size, bits per pixel, the model that made it). "
             "With -q it prints nothing and only checks the input (exit status 0: readable).",
             ["pyratok info clip.safetensors",
              "pyratok info shards/",
              "pyratok info clip.safetensors --json",
              "pyratok info clip.safetensors -q && echo valid"]),
}


def _describe(sub) -> None:
    for name, p in sub.choices.items():
        description, examples = COMMAND_HELP.get(name, (None, []))
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.description = description or p.description
        if examples:
            p.epilog = "examples:\n" + "\n".join("  " + e for e in examples)


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads, got {n}")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        self.exit(EXIT_USER_ERROR, f"pyratok: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyratok", description="PyraTok video tokenizer: encode videos to pyramids of binary "
                                                 "tokens, decode them, reconstruct, train and evaluate.")
    from pyratok import __version__

    parser.add_argument("--version", action="version", version=f"pyratok {__version__}")
    parser.add_argument("--threads", type=_threads, metavar="N",
                        help="CPU threads for torch (default: torch's choice, the physical cores)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, model=True):
        if model:
            p.add_argument("--model", help="model folder (default: the bundled default model)")
            p.add_argument("--rate", choices=RATES,
                           help="operating point of the bundled model (without --model): low = K=16 bits "
                                "per token, ~0.1 bits/pixel (the default); high = K=48 on a finer grid, ~2.1 bits/pixel")
            p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
            p.add_argument("--tile", default="auto",
                           help="spatial tiles of N latent pixels (exact, bounds memory); 'none' for whole frames; "
                                f"default 'auto': tiles of {AUTO_TILE} when a frame exceeds {AUTO_TILE} latent pixels")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    def clip_options(p):
        p.add_argument("--frames", type=int, help="frames to use, 1 + 4k (default: as many as fit)")
        p.add_argument("--size", help="resize and centre-crop to HEIGHTxWIDTH (multiples of 8)")

    p = sub.add_parser("encode", help="videos -> token files")
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    p.add_argument("-o", "--output", required=True, help="token file (*.safetensors) or folder for several videos")
    p.add_argument("--text", help="caption to condition the tokens on (needs a model with a text encoder)")
    p.add_argument("--overwrite", action="store_true", help="replace token files that exist")
    clip_options(p)
    common(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("tokenize", help="a folder or manifest of videos -> token shards (batched, resumable, torchrun)")
    p.add_argument("source", metavar="SOURCE", help="folder of videos, or a JSONL/CSV manifest (path, caption, start, end)")
    p.add_argument("-o", "--output", required=True, help="output folder of tar shards + index.json")
    p.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k (default 17)")
    p.add_argument("--stride", type=int, help="sampled frames between clip starts (default: --frames, back to back)")
    p.add_argument("--size", help="resize and centre-crop to HEIGHTxWIDTH (default: each video's own size)")
    p.add_argument("--fps", type=float, help="sampling frame rate (default: each file's own)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per encode call (default 8)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding video (default 2)")
    p.add_argument("--videos-per-shard", type=int, default=32, help="manifest entries per shard (default 32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset made with other settings in the output folder")
    common(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("decode", help="a token file -> video (H.264 mp4)")
    p.add_argument("tokens", metavar="TOKENS")
    p.add_argument("-o", "--output", required=True, help="output video, e.g. out.mp4")
    common(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="video -> tokens -> video, with side-by-side video, PNG grid, metrics")
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--text", help="caption to condition the tokens on")
    p.add_argument("--lpips", help="local LPIPS (VGG) weights file, to report LPIPS")
    clip_options(p)
    common(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("train", help="train from a TOML config (single process, or under torchrun)")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--lpips", help="local LPIPS (VGG) weights file: adds the LPIPS reconstruction term "
                                   "(overrides [model] lpips)")
    common(p, model=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="reconstruction metrics over a folder or manifest of videos")
    p.add_argument("data", metavar="DATA")
    p.add_argument("-o", "--output", required=True, help="output folder (metrics.json, eval.png)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k (default 17)")
    p.add_argument("--size", help="HEIGHTxWIDTH centre crop (default 128x128)")
    p.add_argument("--fps", type=float, help="sampling frame rate (default: each file's own)")
    p.add_argument("--resize", type=int, default=0,
                   help="short side before the centre crop (default 0: the smallest size covering --size)")
    p.add_argument("--limit", type=int, help="evaluate at most this many videos")
    p.add_argument("--lpips", help="local LPIPS (VGG) weights file")
    p.add_argument("--use-captions", action="store_true", help="condition on the manifest's captions")
    common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="describe a token file or a token shard folder")
    p.add_argument("tokens", metavar="TOKENS", help="token file, or a folder written by `pyratok tokenize`")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    common(p, model=False)
    p.set_defaults(func=cmd_info)
    _describe(sub)
    return parser


def _stdout_closed() -> int:
    """The reader of our stdout went away (``pyratok info --json | head -1``): stop quietly,
    with the status a process killed by SIGPIPE has, and no traceback at interpreter exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv=None) -> int:
    from pyratok.train.loop import NonFiniteLossError

    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except UserError as err:
        print(f"pyratok: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, ValueError) as err:
        print(f"pyratok: error: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as err:
        print(f"pyratok: error: {err}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except KeyboardInterrupt:
        print("pyratok: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
