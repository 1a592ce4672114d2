"""The Wan VAE's share of a window on one GPU: the streamed decode against diffusers', and its cost.

    python benchmarks/bench_vae.py --out DIR          # CUDA; diffusers AutoencoderKLWan() defaults, random weights, bf16

The decode of one 117-frame window (latent 16 x 30 x 60 x 104 -> 117 x 480 x 832) and the encodes of a
window: its last 25 frames (the next window's motion latents) and the 117-frame [reference, zeros]
conditioning (once per job for an image, every window when dubbing a video), in bf16. Encodes by
diffusers, streamed and streamed compiled, against an fp32 encode. Decodes, each timed and compared
with an fp32 decode of the same latents by diffusers (the reference) and with diffusers' bf16 decode:
  diffusers         AutoencoderKLWan.decode, what WanVAE ran before pipeline/models/vae_stream.py
  stream            WanVAE.decode: the streamed decode, eager (memory.compile off)
  stream_compiled   the stream after compile_vae (memory.compile on); its first call is timed apart
  *_layout          the same after apply_vae_layout (pipeline/models/vae_layout.py: channels-last,
                    the 96-channel layers padded to 128), on a copy of the module
Plus torch.profiler tables of the diffusers and the compiled decodes, and what is allocated at each
compiled decode's peak (the allocator's trace, grouped by the line that allocated). Times: wall clock
around a synchronised call, one warm-up, median of 3; peak = max_memory_allocated during the calls.
"""

import argparse
import datetime
import json
import linecache
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import profile_kernels, rel_err
from diffusers import AutoencoderKLWan

from pipeline.models.vae import compile_vae
from pipeline.models.vae_layout import apply_vae_layout
from pipeline.models.vae import WanVAE


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


def start(description: str) -> tuple[Path, dict]:
    """The --out folder (made) and the results dict with the run's environment: a GPU benchmark's start."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "command": " ".join(sys.argv)}
    return out, {"env": env}


def main():
    out, results = start(__doc__)
    save = lambda: (out / "bench_vae.json").write_text(json.dumps(results, indent=1))

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
        profile("diffusers", lambda: module.decode(z.to(torch.bfloat16)), results, save)

        laid_out_module = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)
        laid_out_module.load_state_dict(module.state_dict())
        laid_out = WanVAE(laid_out_module)
        apply_vae_layout(laid_out)
        for suffix, variant in (("", vae), ("_layout", laid_out)):
            record("stream" + suffix, timed(lambda: variant.decode(latents)))
            record_encodes("stream" + suffix, lambda v: variant._encode_stream(v.to(torch.bfloat16)))
            compile_vae(variant)
            t0 = time.perf_counter()
            variant.decode(latents)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            record("stream_compiled" + suffix, timed(lambda: variant.decode(latents)) | {"first_call_s": first})
            t0 = time.perf_counter()
            variant._encode_stream(frames.to(torch.bfloat16))
            torch.cuda.synchronize()
            results[f"encode_stream_compiled{suffix}_first_call_s"] = time.perf_counter() - t0
            record_encodes("stream_compiled" + suffix, lambda v: variant._encode_stream(v.to(torch.bfloat16)))
            profile("stream_compiled" + suffix, lambda: variant.decode(latents), results, save)
            results["peak_stream_compiled" + suffix] = peak_breakdown(lambda: variant.decode(latents))
            print("peak_stream_compiled" + suffix, json.dumps(results["peak_stream_compiled" + suffix], indent=1), flush=True)
            save()


def profile(name, fn, results, save):
    table = profile_kernels(fn, cuda=True, top=15)
    results[f"profile_{name}"] = table
    print(f"profile {name}", table["total_ms"], table["categories_ms"], flush=True)
    for row in table["top"][:12]:
        print(f"  {row['self_ms']:8.1f} ms x{row['count']:5d} {row['name'][:110]}", flush=True)
    save()


def peak_breakdown(fn, top=12) -> dict:
    """What is allocated at the moment of fn's peak: the caching allocator's trace replayed, the live
    blocks grouped by the Python line that allocated them (for a compiled graph, Inductor's buffer)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    fn()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    groups: dict = {}
    for event in at_peak.values():
        frame = next((f for f in event["frames"] if f["filename"].endswith(".py")), {"filename": "?", "line": 0})
        key = f"{frame['filename']}:{frame['line']} {linecache.getline(frame['filename'], frame['line']).strip()[:90]}"
        count, size = groups.get(key, (0, 0))
        groups[key] = (count + 1, size + event["size"])
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {"allocated_before_gib": before / 2**30, "peak_in_call_gib": peak / 2**30,
            "top": [{"where": key, "blocks": n, "gib": size / 2**30} for key, (n, size) in rows]}


if __name__ == "__main__":
    main()
