"""Inductor's two ways to build the causal convs' cat([cache, x]) in the compiled VAE, with and without
apply_vae_layout: time and memory of a window's decode and encodes on one GPU.

    python3 benchmarks/bench_vae_cat.py          # CUDA; prints one line per variant

By default Inductor fills a cat's buffer slice by slice and copies the cache slices, which need only the
graph's inputs, at the graph's start, so every conv's 6-frame buffer is alive at once;
`force_pointwise_cat` writes each buffer in one kernel when its input is ready (benchmarks/RESULTS.md,
"The VAE laid out for cuDNN": it saves memory and costs 5-7% of the time, so compile_vae keeps the
default). Times: median of 3 after a warm-up; memory: allocated during the call above what was resident.
"""
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models.vae_layout import apply_vae_layout
from pipeline.models.vae import WanVAE
from pipeline.models.vae_stream import decode_chunk, encode_chunk


def measure(fn) -> tuple[float, float]:
    """(median seconds of 3, GiB allocated during a call above what was resident)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[1], 3), round((torch.cuda.max_memory_allocated() - resident) / 2**30, 2)


def main():
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 512
    base = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    latents = torch.randn(1, 16, 30, 60, 104, device="cuda")
    video = torch.rand(1, 3, 117, 480, 832, device="cuda") * 2 - 1
    with torch.inference_mode():
        for layout in (False, True):
            for pointwise in (False, True):
                torch._dynamo.reset()
                module = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)
                module.load_state_dict(base.state_dict())
                vae = WanVAE(module)
                if layout:
                    apply_vae_layout(vae)
                options = {"force_pointwise_cat": pointwise}
                vae.decode_chunk = torch.compile(decode_chunk, dynamic=False, options=options)
                vae.encode_chunk = torch.compile(encode_chunk, dynamic=False, options=options)
                result = {
                    "decode": measure(lambda vae=vae: vae.decode(latents)),
                    "encode117": measure(lambda vae=vae: vae.encode(video)),
                    "encode25": measure(lambda vae=vae: vae.encode(video[:, :, :25])),
                }
                print("layout" if layout else "plain", "pointwise_cat" if pointwise else "default_cat", result, flush=True)
                del vae, module
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
