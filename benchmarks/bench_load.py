"""Host RAM and time of loading the 14B DiT from the official on-disk layout onto one GPU.

    python benchmarks/bench_load.py --dir /scratch/ckpt --out DIR          # CUDA; ~43 GB of disk

Writes the full-size DiT with random weights in the official layout (benchmarks/write_checkpoints.py's
write_dit: config.json, 7 shards of the Wan keys and their index, the InfiniteTalk audio
file in fp32), then loads it with pipeline.models.checkpoints.load_dit in a fresh process per
configuration, recording the process's peak resident set (VmHWM: its own memory plus the file pages it
has mapped), the time, and the GPU memory. The official DiT shards are fp32 (~9.4 GB each, 66 GB in
all); the lent machine's disk does not hold them next to the rest, so they are written in bf16 (7 x ~4.7 GB).
The largest file, the one a streaming loader's peak depends on, is the audio file either way
(2.49 B parameters in fp32, ~10 GB).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import TINY, host_status  # noqa: E402

from pipeline.models.checkpoints import load_dit  # noqa: E402
from pipeline.models.dit import DiTConfig  # noqa: E402
from write_checkpoints import official_paths, write_dit  # noqa: E402

GiB = 2**30
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def write(root: Path, cfg: DiTConfig) -> dict:
    started = time.perf_counter()
    write_dit(root, cfg, torch.float32)  # the audio file in fp32, as official
    paths = official_paths(root)
    files = sorted(paths.wan_dir.glob("*.safetensors")) + [paths.infinitetalk]
    return {"s": time.perf_counter() - started, "files_gb": {f.name: f.stat().st_size / 1e9 for f in files}}


def load(root: Path, quant: str | None) -> dict:
    """One load in this process (run in a fresh one per configuration)."""
    paths = official_paths(root)
    cuda = DEVICE == "cuda"
    if cuda:
        torch.empty(1, device=DEVICE)  # the CUDA context, before the baseline
    before = host_status()
    started = time.perf_counter()
    model = load_dit(paths.dit_files(), paths.infinitetalk, paths.dit_config(), DEVICE, torch.bfloat16, quant)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    after = host_status()
    return {"quant": quant, "device": DEVICE, "s": seconds, "baseline": before, "after": after,
            "peak_rss_gib": after["VmHWM"], "growth_gib": after["VmHWM"] - before["VmRSS"],
            "gpu_allocated_gib": torch.cuda.memory_allocated() / GiB if cuda else None,
            "params": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="where to write the checkpoint (~43 GB)")
    parser.add_argument("--tiny", action="store_true", help="toy-size model (CPU is fine)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--load", choices=["bf16", "fp8"], help="(internal) load once in this process and print JSON")
    args = parser.parse_args()
    root = Path(args.dir)
    if args.load:
        print(json.dumps(load(root, None if args.load == "bf16" else args.load)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"env": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
                       "torch": torch.__version__, "command": " ".join(sys.argv)}}
    results["write"] = write(root, TINY if args.tiny else DiTConfig())
    print("write", results["write"], flush=True)
    modes = ("bf16", "fp8") if DEVICE == "cuda" else ("bf16",)  # fp8 GEMM layers need sm89+
    for mode in modes:
        done = subprocess.run([sys.executable, __file__, "--dir", str(root), "--load", mode],
                              capture_output=True, text=True)
        results[f"load_{mode}"] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else done.stderr[-2000:]
        print(mode, results[f"load_{mode}"], flush=True)
        (out / "bench_load.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
