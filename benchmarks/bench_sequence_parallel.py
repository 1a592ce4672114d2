"""One DiT forward of the 14B on 1 GPU vs G GPUs with Ulysses sequence parallelism (pipeline/parallel.py).

    python benchmarks/bench_sequence_parallel.py --out DIR            # every visible GPU, NCCL
    python benchmarks/bench_sequence_parallel.py --tiny --out DIR     # toy size, 2 processes, gloo on CPU

One process per GPU (torch.multiprocessing spawn). Every rank builds the model with bench_dit's builder
(DiTConfig() defaults, random bf16 weights made on the GPU; fp32 where `keeps_fp32`), then rank 0's
weights and inputs are broadcast so that every rank holds exactly the same. Inputs as bench_dit: one
speaker, t = 500, 117 frames at 832x480 = latent 30x60x104 = 46,800 tokens.

  single    rank 0 alone, the plain model: one warm-up forward (its output kept), then the median of
            --reps timed forwards (CUDA events); the other ranks wait
  single_contiguous  the same, with x made contiguous before block 0 (a hook in this script): the
            plain DiT's residual stream is a transposed view, which slows its elementwise work
  parallel  apply_sequence_parallel on every rank; one warm-up, then --reps timed forwards, each
            started after a barrier; the time of a forward is the slowest rank's. Output vs `single`
  a2a       the two Ulysses all-to-alls of one block alone, at the forward's exact shapes (q, k, v out
            [G, 3, B, L/G, H/G, Dh] bf16; attention back [G, B, L/G, H/G, Dh]): median ms and bandwidth;
            x num_layers = the communication floor of one forward
  interleaved  (--interleave N) N alternated pairs of a G=1 forward and a G=G forward (sequence
            parallelism removed and applied again between), so clock drift cannot favour either
  profile   one forward under torch.profiler on rank 0, plain (rank 0 alone) and parallel: GPU kernel
            time by category (NCCL kernel time includes waiting for the other rank)
  two_speakers  a 13-frame two-speaker forward (reference map across ranks) on G ranks vs rank 0 alone

--quant, --attention and --compile set the model up as a renderer with those settings would be (fp8
layers, the attention backend, compiled blocks; all before sequence parallelism, as the renderer does).

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1; set here for the spawned processes too). Results: DIR/bench_sequence_parallel.json.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import Bench, categorise, rel_err  # noqa: E402

from pipeline.kernels import fp8  # noqa: E402
from pipeline.kernels.attention import apply_attention  # noqa: E402
from pipeline.kernels.compile import compile_blocks  # noqa: E402
from pipeline.parallel import apply_sequence_parallel  # noqa: E402

GiB = 2**30


class Rank:
    def __init__(self, rank: int, world: int, args):
        self.rank, self.world, self.args = rank, world, args
        self.cuda = torch.cuda.is_available() and not args.tiny_cpu
        self.device = torch.device("cuda", rank) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.bench = Bench(argparse.Namespace(tiny=args.tiny, out=args.out, budget_s=1e9, reps=args.reps))
        self.bench.device, self.bench.cuda = self.device, self.cuda
        self.results: dict = {"world": world, "errors": {}}

    def log(self, *what):
        if self.rank == 0:
            print(*what, flush=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        """ms of one call on this rank (CUDA events on GPUs)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def slowest(self, ms: float) -> float:
        t = torch.tensor([ms], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def save(self):
        if self.rank == 0:
            Path(self.args.out, "bench_sequence_parallel.json").write_text(json.dumps(self.results, indent=1, default=str))

    # ------------------------------------------------------------------ steps

    def setup(self):
        t0 = time.perf_counter()
        model = self.bench.build_model()
        for p in model.parameters():  # one set of weights on every rank, whatever the RNG did
            dist.broadcast(p.data, src=0)
        frames = self.args.frames or (117 if not self.args.tiny else 13)
        inputs = self.bench.inputs(frames)
        for v in inputs.values():
            dist.broadcast(v, src=0)
        if self.args.quant != "none":  # deterministic: every rank quantises the same weights alike
            fp8.apply_fp8(model, self.args.quant, self.device)
        apply_attention(model, self.args.attention, self.device)
        if self.args.compile:  # before sequence parallelism, as the renderer does
            compile_blocks(model, self.device)
        self.sync()
        cfg = model.cfg
        self.results["setup"] = {
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if self.cuda else None,
            "params": sum(p.numel() for p in model.parameters()), "frames": frames,
            "quant": self.args.quant, "attention": self.args.attention, "compile": self.args.compile,
            "latent": list(inputs["x"].shape[2:]), "heads": cfg.num_heads, "layers": cfg.num_layers, "dim": cfg.dim,
            "s": time.perf_counter() - t0,
        }
        self.log("setup", self.results["setup"])
        return model, inputs

    def single(self, model, inputs):
        entry = {}
        if self.rank == 0:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model(**inputs)
                self.sync()
                entry["warmup_s"] = time.perf_counter() - t0
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = [self.timed(lambda: model(**inputs)) for _ in range(self.args.reps)]
            entry |= {"ms_median": statistics.median(times), "ms_all": times,
                      "peak_gib": torch.cuda.max_memory_allocated() / GiB if self.cuda else None}
            self.reference = out
            self.log("single", entry)
        dist.barrier()
        self.results["single"] = entry

    def single_contiguous(self, model, inputs):
        """G=1 again with the residual stream made contiguous before block 0 (a hook here, not in the
        library). The plain DiT keeps x as the transposed view of the patch embedding's [B, D, L], so
        every block's elementwise work runs strided; sequence parallelism's split makes it contiguous.
        This is the fair baseline for the speed-up."""
        entry = {}
        if self.rank == 0:
            def contiguous(module, args, kwargs):
                return (args[0].contiguous(), *args[1:]), kwargs

            handle = model.blocks[0].register_forward_pre_hook(contiguous, with_kwargs=True)
            try:
                with torch.inference_mode():
                    out = model(**inputs)
                    self.sync()
                    times = [self.timed(lambda: model(**inputs)) for _ in range(self.args.reps)]
            finally:
                handle.remove()
            entry = {"ms_median": statistics.median(times), "ms_all": times,
                     "velocity_rel_err_vs_single": rel_err(out, self.reference)}
            self.log("single_contiguous", entry)
        dist.barrier()
        self.results["single_contiguous"] = entry

    def parallel(self, model, inputs):
        sp = apply_sequence_parallel(model)
        with torch.inference_mode():
            dist.barrier()
            t0 = time.perf_counter()
            out = model(**inputs)
            self.sync()
            warm = time.perf_counter() - t0
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            times, own = [], []
            for _ in range(self.args.reps):
                dist.barrier()
                ms = self.timed(lambda: model(**inputs))
                own.append(ms)
                times.append(self.slowest(ms))
        entry = {
            "ranks": self.world, "tokens": sp.shard.tokens, "tokens_per_rank": sp.shard.local,
            "warmup_s": warm, "ms_median": statistics.median(times), "ms_all": times, "rank0_ms_all": own,
            "peak_gib_rank0": torch.cuda.max_memory_allocated() / GiB if self.cuda else None,
        }
        if self.rank == 0:
            entry["velocity_rel_err_vs_single"] = rel_err(out, self.reference)
            entry["finite"] = bool(torch.isfinite(out).all())
            single = self.results["single"]["ms_median"]
            entry["speedup"] = single / entry["ms_median"]
            entry["efficiency"] = entry["speedup"] / self.world
            if self.results.get("single_contiguous"):
                entry["speedup_vs_single_contiguous"] = self.results["single_contiguous"]["ms_median"] / entry["ms_median"]
        self.results["parallel"] = entry
        self.log("parallel", entry)
        return sp

    def all_to_all(self, model, sp):
        """The block's two all-to-alls alone, at the forward's shapes."""
        cfg, g, s = model.cfg, self.world, sp.shard
        b, hg, d = 1, cfg.num_heads // g, cfg.head_dim
        res = {}
        for name, shape in (("qkv", (g, 3, b, s.local, hg, d)), ("out", (g, b, s.local, hg, d))):
            send = torch.randn(shape, device=self.device).to(torch.bfloat16)
            recv = torch.empty_like(send)
            for _ in range(2):
                dist.all_to_all_single(recv, send)
            self.sync()
            times = []
            for _ in range(10):
                dist.barrier()
                times.append(self.slowest(self.timed(lambda recv=recv, send=send: dist.all_to_all_single(recv, send))))
            ms = statistics.median(times)
            moved = send.numel() * send.element_size() * (g - 1) / g  # bytes each rank sends to the others
            res[name] = {"shape": list(shape), "mib": send.numel() * send.element_size() / 2**20, "ms_median": ms,
                         "send_GBps_per_rank": moved / ms / 1e6}
        per_block = res["qkv"]["ms_median"] + res["out"]["ms_median"]
        res["per_block_ms"] = per_block
        res["per_forward_ms"] = per_block * cfg.num_layers
        if self.rank == 0:
            single = self.results["single"]["ms_median"]
            par = self.results["parallel"]["ms_median"]
            res["ideal_ms"] = single / g
            res["overhead_ms"] = par - single / g
        self.results["a2a"] = res
        self.log("a2a", res)

    def profile(self, model, inputs, key: str = "profile_parallel", alone: bool = False):
        """GPU kernel time by category over one forward on rank 0 (alone: the plain model, rank 0 only)."""
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            dist.barrier()
            if self.rank != 0:
                if not alone:
                    model(**inputs)
                    self.sync()
                dist.barrier()
                return
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                model(**inputs)
                self.sync()
            wall = (time.perf_counter() - t0) * 1e3
        dist.barrier()
        cats: dict[str, float] = {}
        rows = []
        for evt in prof.key_averages():
            if self.cuda:
                if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                    continue
                t = getattr(evt, "self_device_time_total", 0)
            else:
                t = evt.self_cpu_time_total
            if t <= 0 or evt.key.startswith("nccl:"):  # "nccl:all_to_all" annotates the kernel: count it once
                continue
            cat = "nccl" if "nccl" in evt.key.lower() else categorise(evt.key)
            cats[cat] = cats.get(cat, 0.0) + t / 1e3
            rows.append({"name": evt.key[:160], "self_ms": t / 1e3, "count": evt.count, "category": cat})
        rows.sort(key=lambda r: -r["self_ms"])
        self.results[key] = {
            "wall_ms_profiled": wall, "kernel_ms": sum(cats.values()),
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top": rows[:30],
        }
        self.log(key, {k: v for k, v in self.results[key].items() if k != "top"})

    def interleave(self, model, inputs, sp):
        """G=1 and G=G forwards alternated, so that clock or temperature drift cannot favour either."""
        pairs = []
        with torch.inference_mode():
            for _ in range(self.args.interleave):
                sp.remove()
                dist.barrier()
                single = self.timed(lambda: model(**inputs)) if self.rank == 0 else None
                dist.barrier()
                sp = apply_sequence_parallel(model)
                dist.barrier()
                par = self.slowest(self.timed(lambda: model(**inputs)))
                pairs.append((single, par))
        entry = {"pairs_ms": pairs}
        if self.rank == 0:
            entry["single_median"] = statistics.median(p[0] for p in pairs)
            entry["parallel_median"] = statistics.median(p[1] for p in pairs)
            entry["speedup"] = entry["single_median"] / entry["parallel_median"]
        self.results["interleaved"] = entry
        self.log("interleaved", entry)
        return sp

    def two_speakers(self, model, sp):
        """Correctness at the real width on this backend: a short two-speaker forward (reference map,
        frame-0 keys, global min/max) on G ranks vs rank 0 alone."""
        frames = 13 if not self.args.tiny else 9
        inputs = self.bench.inputs(frames)
        gen = torch.Generator(self.device).manual_seed(7)
        inputs["audio"] = torch.cat([inputs["audio"], torch.randn(inputs["audio"].shape, generator=gen, device=self.device)], 1)
        h, w = inputs["x"].shape[-2:]
        masks = torch.zeros(3, h, w, device=self.device)
        masks[0, h // 4 :, : w // 2] = 1
        masks[1, h // 4 :, w // 2 :] = 1
        masks[2, : h // 4] = 1
        inputs["ref_masks"] = masks
        for v in inputs.values():
            dist.broadcast(v, src=0)
        with torch.inference_mode():
            sp.remove()
            ref = model(**inputs) if self.rank == 0 else None
            dist.barrier()
            sp = apply_sequence_parallel(model)
            out = model(**inputs)
        entry = {"frames": frames, "tokens": sp.shard.tokens}
        if self.rank == 0:
            entry["velocity_rel_err_vs_single"] = rel_err(out, ref)
            entry["finite"] = bool(torch.isfinite(out).all())
        self.results["two_speakers"] = entry
        self.log("two_speakers", entry)

    def main(self):
        model, inputs = self.step("setup", self.setup)
        self.step("single", self.single, model, inputs)
        if not self.args.no_profile:
            self.step("profile_single", self.profile, model, inputs, "profile_single", True)
        if not self.args.no_contiguous_baseline:
            self.step("single_contiguous", self.single_contiguous, model, inputs)
        sp = self.step("parallel", self.parallel, model, inputs)
        if self.args.interleave:
            sp = self.step("interleaved", self.interleave, model, inputs, sp)
        self.step("a2a", self.all_to_all, model, sp)
        if not self.args.no_profile:
            self.step("profile_parallel", self.profile, model, inputs)
        if not self.args.no_two_speakers:
            self.step("two_speakers", self.two_speakers, model, sp)
        self.save()

    def step(self, name, fn, *a):
        t0 = time.perf_counter()
        try:
            return fn(*a)
        except Exception as exc:
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            self.save()
            raise
        finally:
            self.log(f"[{name}] {time.perf_counter() - t0:.1f} s")
            self.save()


def run_group(fn, world: int, cuda: bool, *args) -> None:
    """fn(rank, world, *args) in `world` spawned processes that form the default process group: NCCL
    with rank r on GPU r, or gloo on the CPU (its cores shared out). Also used by bench_window.py."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_member, args=(fn, world, port, cuda, args), nprocs=world)


def _member(rank: int, fn, world: int, port: int, cuda: bool, args: tuple) -> None:
    kw = {"device_id": torch.device("cuda", rank)} if cuda else {}
    if cuda:
        torch.cuda.set_device(rank)
    else:  # the ranks share the CPU
        torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=5), **kw)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def worker(rank: int, world: int, args) -> None:
    Rank(rank, world, args).main()


def summary(out: Path) -> None:
    r = json.loads((out / "bench_sequence_parallel.json").read_text())
    s, p, a = r.get("single", {}), r.get("parallel", {}), r.get("a2a", {})
    print("\n=== sequence parallel DiT forward ===")
    print(f"setup: {r.get('setup')}")
    print(f"G=1: {s.get('ms_median', float('nan')):.1f} ms  (all {s.get('ms_all')}, peak {s.get('peak_gib')})")
    print(f"G={r['world']}: {p.get('ms_median', float('nan')):.1f} ms  (all {p.get('ms_all')}, peak rank 0 {p.get('peak_gib_rank0')})")
    if r.get("single_contiguous"):
        c = r["single_contiguous"]
        print(f"G=1, contiguous residual stream: {c['ms_median']:.1f} ms (rel err vs G=1 {c['velocity_rel_err_vs_single']:.2e}); "
              f"speed-up of G={r['world']} over it {p.get('speedup_vs_single_contiguous', float('nan')):.3f}x")
    print(f"speed-up {p.get('speedup', float('nan')):.3f}x, efficiency {p.get('efficiency', float('nan')):.3f}, "
          f"velocity rel err vs G=1 {p.get('velocity_rel_err_vs_single')}")
    if a:
        print(f"all-to-all: qkv {a['qkv']['ms_median']:.3f} ms ({a['qkv']['send_GBps_per_rank']:.0f} GB/s sent per rank), "
              f"out {a['out']['ms_median']:.3f} ms; per forward {a['per_forward_ms']:.1f} ms; "
              f"overhead over ideal {a.get('overhead_ms', float('nan')):.1f} ms")
    if "interleaved" in r:
        print(f"interleaved: {r['interleaved']}")
    for key in ("profile_single", "profile_parallel"):
        if key in r:
            print(f"{key} rank 0: wall {r[key]['wall_ms_profiled']:.0f} ms, kernels {r[key]['kernel_ms']:.0f} ms: "
                  f"{ {k: round(v, 1) for k, v in r[key]['categories_ms'].items()} }")
    if "two_speakers" in r:
        print(f"two speakers: {r['two_speakers']}")
    if r["errors"]:
        print("errors:", {k: v.splitlines()[0] for k, v in r["errors"].items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-size model and shapes; on CPU with gloo")
    parser.add_argument("--ranks", type=int, default=None, help="processes (default: the GPU count, 2 on CPU)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default 117; tiny 13)")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per configuration")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-contiguous-baseline", action="store_true", help="skip the contiguous G=1 baseline")
    parser.add_argument("--interleave", type=int, default=0, help="also time N alternated G=1 / G=G pairs")
    parser.add_argument("--quant", default="none", choices=["none", "fp8", "fp8_weights"], help="the blocks' linears")
    parser.add_argument("--attention", default="sdpa", help="attention backend (pipeline.kernels.attention)")
    parser.add_argument("--compile", action="store_true", help="compile the blocks (before sequence parallelism)")
    parser.add_argument("--no-two-speakers", action="store_true", help="skip the two-speaker check")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    args.tiny_cpu = args.tiny or not torch.cuda.is_available()
    world = args.ranks or (torch.cuda.device_count() if not args.tiny_cpu else 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run_group(worker, world, not args.tiny_cpu, args)
    summary(Path(args.out))


if __name__ == "__main__":
    main()
