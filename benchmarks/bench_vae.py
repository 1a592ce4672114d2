"""The Wan VAE's share of a window on one GPU: the streamed decode against diffusers', and its cost.

    python benchmarks/bench_vae.py --out DIR          # CUDA; diffusers AutoencoderKLWan() defaults, random weights, bf16

The decode of one 117-frame window (latent 16 x 30 x 60 x 104 -> 117 x 480 x 832) and the encodes of a
window: its last 25 frames (the next window's motion latents) and the 117-frame [reference, zeros]
conditioning (once per job for an image, every window when dubbing a video), in bf16. Encodes by
diffusers, streamed and streamed compiled, against an fp32 encode. Decodes, each timed and compared
with an fp32 decode of the same latents by diffusers (the reference) and with diffusers' bf16 decode:
  diffusers         AutoencoderKLWan.decode, what WanVAE ran before pipeline/models/vae_stream.py
  stream            WanVAE.decode: the streamed decode, eager (memory.compile off)
  stream_cl3d       the same with the conv3d weights in channels_last_3d (cuDNN's layout on Hopper)
  stream_compiled   the stream after compile_vae (memory.compile on); its first call is timed
                    apart. (Not also with channels_last_3d weights: the compiled graph does not guard
                    on its weights' strides, so switching them after compiling fails its assertion.)
Plus torch.profiler tables of the diffusers and the compiled decodes. Times: wall clock around a
synchronised call, one warm-up, median of 3; peak = max_memory_allocated during the calls.
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

from bench_dit import profile_kernels, rel_err  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from pipeline.kernels.compile import compile_vae  # noqa: E402
from pipeline.models.vae import WanVAE  # noqa: E402


def timed(fn, reps=3) -> dict:
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "out": out}


def conv3d_weights(module, memory_format) -> None:
    for p in module.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=memory_format)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                             "command": " ".join(sys.argv)}}
    save = lambda: (out / "bench_vae.json").write_text(json.dumps(results, indent=1))  # noqa: E731

    module = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 16, 30, 60, 104, device="cuda", generator=gen)
    frames = torch.rand(1, 3, 25, 480, 832, device="cuda", generator=gen) * 2 - 1
    conditioning = torch.zeros(1, 3, 117, 480, 832, device="cuda")
    conditioning[:, :, 0] = frames[:, :, 0]
    videos = {"motion_25": frames, "conditioning_117": conditioning}  # what a window encodes

    with torch.inference_mode():
        module32 = AutoencoderKLWan().to("cuda").eval().requires_grad_(False)
        module32.load_state_dict(module.state_dict())  # the same (bf16-rounded) weights in fp32
        vae32 = WanVAE(module32)
        z = latents * vae32.latents_std.cuda() + vae32.latents_mean.cuda()  # WanVAE.decode's de-normalisation
        reference = module32.decode(z).sample.clamp(-1, 1)
        encode_reference = {name: module32.encode(v).latent_dist.mean for name, v in videos.items()}
        del module32, vae32
        torch.cuda.empty_cache()

        vae = WanVAE(module)
        diffusers = timed(lambda: module.decode(z.to(torch.bfloat16)).sample.float().clamp(-1, 1))

        def record(name, run):
            got = run.pop("out")
            run |= {"rel_err_vs_fp32": rel_err(got, reference), "rel_err_vs_diffusers_bf16": rel_err(got, diffusers["out"])}
            results[name] = run
            print(name, run, flush=True)
            save()

        record("diffusers", dict(diffusers))

        def record_encodes(name, encode):
            for video_name, video in videos.items():
                run = timed(lambda: encode(video))
                got = run.pop("out")
                results[f"encode_{video_name}_{name}"] = run | {"rel_err_vs_fp32": rel_err(got, encode_reference[video_name])}
                print(f"encode_{video_name}_{name}", results[f"encode_{video_name}_{name}"], flush=True)
            save()

        record_encodes("diffusers", lambda v: module.encode(v.to(torch.bfloat16)).latent_dist.mean)
        record_encodes("stream", lambda v: vae._encode_stream(v.to(torch.bfloat16)))
        record("stream", timed(lambda: vae.decode(latents)))
        conv3d_weights(module, torch.channels_last_3d)
        record("stream_cl3d", timed(lambda: vae.decode(latents)))
        conv3d_weights(module, torch.contiguous_format)

        compile_vae(vae)
        t0 = time.perf_counter()
        vae.decode(latents)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        record("stream_compiled", timed(lambda: vae.decode(latents)) | {"first_call_s": first})
        t0 = time.perf_counter()
        vae._encode_stream(frames.to(torch.bfloat16))
        torch.cuda.synchronize()
        results["encode_compiled_first_call_s"] = time.perf_counter() - t0
        record_encodes("stream_compiled", lambda v: vae._encode_stream(v.to(torch.bfloat16)))

        for name, fn in (("stream_compiled", lambda: vae.decode(latents)),
                         ("diffusers", lambda: module.decode(z.to(torch.bfloat16)))):
            profile = profile_kernels(fn, cuda=True, top=15)
            results[f"profile_{name}"] = profile
            print(f"profile {name}", profile["total_ms"], profile["categories_ms"], flush=True)
            for row in profile["top"][:12]:
                print(f"  {row['self_ms']:8.1f} ms x{row['count']:5d} {row['name'][:110]}", flush=True)
            save()

if __name__ == "__main__":
    main()
