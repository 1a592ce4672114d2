"""VAE tiling (memory=12gb): how far our tiled encode and decode are from untiled, next to how far
diffusers' own tiled AutoencoderKLWan is from its untiled one, on the same weights, input and tiles.

    python benchmarks/bench_vae_tiling.py --out DIR           # CUDA: the 14B's VAE, 117 frames at 832x480, bf16
    python benchmarks/bench_vae_tiling.py --tiny --out DIR    # the tiny VAE on the CPU, a few frames

Random weights (diffusers' initialisation, seeded); the input is the demo picture panning across the
frame, so neighbouring tiles see related content. Relative difference = ||a - b|| / ||b|| over the
whole tensor (frames for decode, normalised latents for encode). Ours = pipeline.models.vae.WanVAE, which
streams untiled work frame by frame and hands tiled work to diffusers; diffusers = the module's own
encode/decode with enable_tiling / disable_tiling.
"""

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models.tiny import TINY_VAE  # noqa: E402
from pipeline.models.vae import VAETiling, WanVAE  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "demo" / "astronaut.png"
TILES = VAETiling()  # conf/memory/12gb.yaml's tiles: diffusers' defaults


def panning_video(frames: int, height: int, width: int) -> torch.Tensor:
    """[1, 3, frames, height, width] in [-1, 1]: the demo picture, shifted one pixel per frame."""
    picture = torch.from_numpy(np.asarray(Image.open(DEMO).convert("RGB"))).permute(2, 0, 1).float()
    picture = F.interpolate(picture[None] / 127.5 - 1, size=(height, width + frames), mode="bilinear")[0]
    return torch.stack([picture[:, :, i : i + width] for i in range(frames)], dim=1)[None]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compare(ours, ours_tiled, theirs, theirs_tiled) -> dict[str, float]:
    return {
        "ours_tiled_vs_untiled": relative(ours_tiled, ours),
        "diffusers_tiled_vs_untiled": relative(theirs_tiled, theirs),
        "ours_vs_diffusers_untiled": relative(ours, theirs),
        "ours_vs_diffusers_tiled": relative(ours_tiled, theirs_tiled),
    }


def diffusers_encode(module: AutoencoderKLWan, vae: WanVAE, video: torch.Tensor, tiled: bool) -> torch.Tensor:
    """diffusers' encode, normalised as WanVAE normalises (posterior mean, per-channel mean and std)."""
    module.enable_tiling(TILES.tile_height, TILES.tile_width, TILES.stride_height, TILES.stride_width) if tiled \
        else module.disable_tiling()
    mu = module.encode(video.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return (mu - vae.latents_mean.to(mu.device)) / vae.latents_std.to(mu.device)


def diffusers_decode(module: AutoencoderKLWan, vae: WanVAE, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
    module.enable_tiling(TILES.tile_height, TILES.tile_width, TILES.stride_height, TILES.stride_width) if tiled \
        else module.disable_tiling()
    z = latents * vae.latents_std.to(latents.device) + vae.latents_mean.to(latents.device)
    return module.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # Precision's VAE default on a GPU
    frames, height, width = (117, 480, 832) if not args.tiny else (9, 320, 320)

    torch.manual_seed(0)
    module = (AutoencoderKLWan(**TINY_VAE) if args.tiny else AutoencoderKLWan()).to(device, dtype).eval()
    video = panning_video(frames, height, width).to(device)
    # The tiling switch lives on the diffusers module: a wrapper is made right before each use.
    normalising = WanVAE(module, None)

    results = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "shape": [frames, height, width], "dtype": str(dtype), "tiles": dataclasses.asdict(TILES)}
    ours_latents, results["ours_encode_untiled_s"] = timed(lambda: WanVAE(module, None).encode(video))
    ours_latents_tiled, results["ours_encode_tiled_s"] = timed(lambda: WanVAE(module, TILES).encode(video))
    theirs_latents = diffusers_encode(module, normalising, video, tiled=False)
    theirs_latents_tiled = diffusers_encode(module, normalising, video, tiled=True)
    results["encode"] = compare(ours_latents, ours_latents_tiled, theirs_latents, theirs_latents_tiled)
    del theirs_latents_tiled, ours_latents_tiled
    decoded, results["ours_decode_untiled_s"] = timed(lambda: WanVAE(module, None).decode(ours_latents))
    decoded_tiled, results["ours_decode_tiled_s"] = timed(lambda: WanVAE(module, TILES).decode(ours_latents))
    theirs = diffusers_decode(module, normalising, ours_latents, tiled=False)
    theirs_tiled = diffusers_decode(module, normalising, ours_latents, tiled=True)
    results["decode"] = compare(decoded, decoded_tiled, theirs, theirs_tiled)
    print(json.dumps(results, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_vae_tiling.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
