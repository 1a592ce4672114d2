"""The Wan VAE decoder's convolutions alone, in the forms cuDNN could run them, on one GPU.

    python benchmarks/bench_vae_conv.py --out DIR          # CUDA

The streamed decode (pipeline/models/vae_stream.py) spends ~600 ms of its 1.6 s in the seven
96-channel full-resolution causal convs of each chunk, which cuDNN runs with an sm80 kernel at ~230
TFLOP/s, while the wider convs get an sm90 kernel at ~630 (benchmarks/RESULTS.md). For one chunk's
conv input (2 cached + 4 new frames) this times, for each conv shape of the decoder's last two levels:
  ncdhw              F.conv3d as the stream runs it (bf16, NCDHW, padding (0, 1, 1))
  ncdhw_benchmark    the same with torch.backends.cudnn.benchmark (cuDNN times its algorithms)
  ndhwc              input and weight in channels_last_3d
  ndhwc_benchmark    both
  pad128             channels zero-padded to 128 (in and out; the same numbers in the first 96)
  pad128_ndhwc       both
  taps_conv2d        the 6 frames as a batch through one 3x3 conv2d (NHWC) with the three temporal taps
                     stacked as 3 x out channels, then out[t] = tap0[t] + tap1[t + 1] + tap2[t + 2]
                     (1.5x the FLOPs, a better GEMM shape)
Each: median ms of 10 (CUDA events), TFLOP/s of the unpadded conv, max relative difference to ncdhw.
"""

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import time_ms  # noqa: E402
from bench_vae import start  # noqa: E402

SHAPES = {  # name: (in channels, out channels, height, width), kernel 3x3x3 on 6 frames -> 4
    "full_res_96": (96, 96, 480, 832),
    "half_res_192": (192, 192, 240, 416),
    "half_res_384_to_192": (384, 192, 240, 416),
}


def variants(x, w, b):
    cl = torch.channels_last_3d
    pad_in, pad_out = 128 - x.shape[1], 128 - w.shape[0]

    def padded(x, w, b):
        xp = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad_in))
        wp = F.pad(w, (0, 0, 0, 0, 0, 0, 0, pad_in, 0, pad_out))
        return xp, wp, F.pad(b, (0, pad_out))

    yield "ncdhw", False, (x, w, b)
    yield "ncdhw_benchmark", True, (x, w, b)
    yield "ndhwc", False, (x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), b)
    yield "ndhwc_benchmark", True, (x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), b)
    if pad_in >= 0 and pad_out >= 0 and (pad_in or pad_out):
        xp, wp, bp = padded(x, w, b)
        yield "pad128", False, (xp, wp, bp)
        yield "pad128_ndhwc", False, (xp.contiguous(memory_format=cl), wp.contiguous(memory_format=cl), bp)


def taps_conv(frames, taps, bias):
    """[6, C, H, W] frames and [3 x Cout, C, 3, 3] taps -> [1, Cout, 4, H, W], as F.conv3d's output."""
    cout = taps.shape[0] // 3
    z = F.conv2d(frames, taps, padding=1)
    y = z[0:4, :cout] + z[1:5, cout : 2 * cout] + z[2:6, 2 * cout :] + bias.view(1, -1, 1, 1)
    return y.transpose(0, 1)[None]


def main():
    out, results = start(__doc__)
    gen = torch.Generator("cuda").manual_seed(0)
    with torch.inference_mode():
        for name, (cin, cout, h, w_) in SHAPES.items():
            x = torch.randn(1, cin, 6, h, w_, device="cuda", generator=gen).bfloat16()
            w = (torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=gen) / (27 * cin) ** 0.5).bfloat16()
            b = torch.zeros(cout, device="cuda", dtype=torch.bfloat16)
            flops = 2 * cout * cin * 27 * 4 * h * w_
            reference = None
            cases = [(v, bench, lambda xi=xi, wi=wi, bi=bi: F.conv3d(xi, wi, bi, padding=(0, 1, 1)))
                     for v, bench, (xi, wi, bi) in variants(x, w, b)]
            frames = x.transpose(1, 2).reshape(6, cin, h, w_).contiguous(memory_format=torch.channels_last)
            taps = w.permute(2, 0, 1, 3, 4).reshape(3 * cout, cin, 3, 3).contiguous(memory_format=torch.channels_last)
            cases.append(("taps_conv2d", False, lambda: taps_conv(frames, taps, b)))
            for variant, benchmark, fn in cases:
                torch.backends.cudnn.benchmark = benchmark
                y = fn()[:, :cout].float()
                reference = y if reference is None else reference
                ms = statistics.median(time_ms(fn, warmup=2, reps=10, cuda=True))
                row = {"ms": ms, "tflops": flops / ms / 1e9,
                       "max_rel_diff": ((y - reference).abs().max() / reference.abs().max()).item()}
                results[f"{name}/{variant}"] = row
                print(f"{name:22s} {variant:16s} {ms:7.3f} ms {row['tflops']:6.0f} TFLOP/s  diff {row['max_rel_diff']:.1e}", flush=True)
            torch.backends.cudnn.benchmark = False
    (out / "bench_vae_conv.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
