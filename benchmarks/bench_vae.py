"""The Wan VAE's share of a window on one GPU: where its decode spends the time, and what would speed it up.

    python benchmarks/bench_vae.py --out DIR          # CUDA; diffusers AutoencoderKLWan() defaults, random weights, bf16

Through pipeline.models.vae.WanVAE, as the renderer calls it: the decode of one 117-frame window
(latent 16 x 30 x 60 x 104 -> 117 x 480 x 832) and the encode of its last 25 frames (the next window's
motion latents). Variants of the decode, each against the default's output:
  default           eager, NCDHW
  channels_last_3d  the conv3d weights in NDHWC (cuDNN's preferred layout on Hopper; the default decode
                    spends ~0.3 s converting layouts)
  compiled          torch.compile of the decoder's forward (dynamic=False)
Plus a torch.profiler table of the default decode's kernels. Times: wall clock around a synchronised
call, one warm-up, median of 3.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import profile_kernels  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from pipeline.models.vae import WanVAE  # noqa: E402


def timed(fn, reps=3) -> tuple[float, torch.Tensor]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--variants", default="channels_last_3d,compiled", help="decode variants after the default")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                             "command": " ".join(sys.argv)}}
    save = lambda: (out / "bench_vae.json").write_text(json.dumps(results, indent=1))  # noqa: E731

    module = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    vae = WanVAE(module)
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 16, 30, 60, 104, device="cuda", generator=gen)
    frames = torch.rand(1, 3, 25, 480, 832, device="cuda", generator=gen) * 2 - 1

    with torch.inference_mode():
        seconds, reference = timed(lambda: vae.decode(latents))
        results["decode_default_s"] = seconds
        results["encode_25_frames_s"] = timed(lambda: vae.encode(frames))[0]
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print("default", results, flush=True)
        results["profile_default"] = profile_kernels(lambda: vae.decode(latents), cuda=True, top=20)
        print("profile", results["profile_default"]["categories_ms"], flush=True)
        for row in results["profile_default"]["top"][:12]:
            print(f"  {row['self_ms']:8.1f} ms x{row['count']:5d} {row['name'][:110]}", flush=True)
        save()

        if "channels_last_3d" in args.variants:
            convs = [p for p in module.parameters() if p.dim() == 5]  # the conv3d weights
            for p in convs:
                p.data = p.data.to(memory_format=torch.channels_last_3d)
            seconds, got = timed(lambda: vae.decode(latents))
            results["decode_channels_last_3d"] = {"s": seconds, "rel_err": rel(got, reference)}
            for p in convs:
                p.data = p.data.contiguous()
            print("channels_last_3d", results["decode_channels_last_3d"], flush=True)
            save()

        if "compiled" in args.variants:
            eager_forward = module.decoder.forward
            module.decoder.forward = torch.compile(eager_forward, dynamic=False)
            t0 = time.perf_counter()
            vae.decode(latents)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            seconds, got = timed(lambda: vae.decode(latents))
            results["decode_compiled"] = {"s": seconds, "first_call_s": first, "rel_err": rel(got, reference)}
            module.decoder.forward = eager_forward
            print("compiled", results["decode_compiled"], flush=True)
            save()


if __name__ == "__main__":
    main()
