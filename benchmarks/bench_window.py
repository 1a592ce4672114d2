"""One whole window per memory preset: seconds, peak GPU memory and host RAM.

    python benchmarks/bench_window.py --out DIR           # the 14B on CUDA (random weights), 117 frames 832x480
    python benchmarks/bench_window.py --tiny --out DIR    # the same code at toy size (CPU: memory=none and fast)
    python benchmarks/bench_window.py --sp 2 --only fast/fp8 --attention int8fp8 --out DIR   # 2 GPUs, Ulysses
    python benchmarks/bench_window.py --tiny --sp 2 --out DIR     # toy size; without CUDA: 2 processes, gloo

A window is what the renderer does for every window after the first (pipeline.render): 4 steps of one
DiT pass each (flowmatch_distill, text and audio scale 1) with 7 clean motion latents, the VAE decode
of its 30 latent frames to 117 frames, colour matching to the reference (mkl), and the VAE encode of its
last 25 frames (the next window's motion latents). It runs through WindowRenderer itself.

Models: the full architecture with random weights, built as benchmarks/bench_dit.py builds it (meta
device, materialised on the GPU in bf16, fp32 where `keeps_fp32`); the VAE is diffusers'
AutoencoderKLWan() with its default (Wan2.1) config and init, in bf16. Each configuration is a memory
preset of conf/memory/ composed through Hydra and turned into MemorySettings by farm.config's
converter (so what is measured is what the presets say), with a quantisation mode:

  fast/bf16  24gb/bf16           one bf16 model: compiled, then its blocks offloaded
  fast/fp8   12gb/fp8_weights    one fp8 model (quant=fp8 on the GPU): compiled, then offloaded;
  12gb/fp8   24gb/fp8            the fp8 layers switched between modes in place

Per configuration: one DiT forward first (it compiles the blocks at this shape, or finds the graph an
earlier configuration compiled: the cache is per code object, shared by the models; with compile, one
VAE decode too, for its compiled graphs), then once per
job the VAE encode of the 117-frame [reference, zeros] conditioning (timed where the VAE tiling
changes; with compile, the first one includes compiling the encode; every window uses the first, untiled one, so that the final latents of two configurations
differ only by the DiT), then the timed window. Times are wall-clock around synchronised phases; peak GPU memory is
torch.cuda.max_memory_allocated (and _reserved, what the allocator held) over each phase, weights
included; host RAM is the process's resident set (VmRSS; peak VmHWM, reset per window through
/proc/self/clear_refs). Results go to DIR/bench_window.json as they come, so a run cut short keeps them.

--sp G: the window of a sequence-parallel group of G GPUs, as the farm runs one (farm/actors.py): G
processes (bench_sequence_parallel.run_group: NCCL, or gloo on the CPU; NVLink multicast off), each
holding the whole model and VAE. Every rank builds them and the inputs as above, takes rank 0's weights
and inputs (broadcast), applies quant, attention and compile as above, then
pipeline.parallel.apply_sequence_parallel; all ranks run the same window in lockstep, the VAE decode,
colour match and motion encode on every rank. The ranks start each window together (a barrier); a
phase's time (and peak memory) is the largest over the ranks. Labels end in /spG (e.g. fast/fp8/sp2);
--only takes the labels without it. Only presets without block offload run (fast, or none where
compiling cannot run); asking for one with offload is an error. `ranks_max_abs_diff` records the
largest difference across the ranks of the window's final latents (0: every rank got the whole output)
and of its motion latents, which each rank encodes itself and which may differ in the last bits on
GPUs (the model takes the first rank's inputs, pipeline/parallel.py). Rank 0 writes the results.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import Bench as DiTBench  # noqa: E402
from bench_dit import host_status  # noqa: E402
from bench_sequence_parallel import run_group  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from farm.config import memory_settings  # noqa: E402
from pipeline.color import match_colors  # noqa: E402
from pipeline.job import RenderSettings  # noqa: E402
from pipeline.assemble import prepare_vae  # noqa: E402
from pipeline.kernels import attention, fp8  # noqa: E402
from pipeline.kernels.attention import apply_attention  # noqa: E402
from pipeline.kernels.compile import compile_blocks, compile_problem  # noqa: E402
from pipeline.kernels.offload import offload_blocks, offload_problem  # noqa: E402
from pipeline.models.checkpoints import Models  # noqa: E402
from pipeline.models.tiny import TINY_VAE  # noqa: E402
from pipeline.timing import StageClock  # noqa: E402
from pipeline.models.vae import VAETiling, WanVAE, latent_frames  # noqa: E402
from pipeline.parallel import apply_sequence_parallel  # noqa: E402
from pipeline.render import JobInputs, WindowRenderer  # noqa: E402
from pipeline.windows import Window, window_audio  # noqa: E402

GiB = 2**30


def preset(memory: str, quant: str):
    """MemorySettings of conf/memory/<memory>.yaml, and the quant mode the composed config ends with."""
    with initialize_config_module("conf", version_base=None):
        cfg = compose("config", overrides=[f"memory={memory}", f"quant={quant}"])
    return memory_settings(cfg), cfg.quant.mode


def reset_host_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class WindowBench:
    def __init__(self, args, rank: int = 0, world: int = 1):
        self.args, self.rank, self.world = args, rank, world
        # in a group, "cuda" is the rank's own GPU: run_group made it the current device
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dit_bench = DiTBench(argparse.Namespace(tiny=args.tiny, out=str(self.out / "dit"), budget_s=1e9, reps=1))
        self.cfg = self.dit_bench.cfg
        self.results: dict = {"errors": {}, "configs": {}}
        self.started = time.perf_counter()
        self.latents: dict[str, torch.Tensor] = {}  # the final latent of each window, for the comparisons
        self.frames: dict[str, torch.Tensor] = {}
        if args.tiny:
            self.frames_n, self.motion_n, self.height, self.width = 13, 5, 64, 64
        else:
            self.frames_n, self.motion_n, self.height, self.width = 117, 25, 480, 832

    # ------------------------------------------------------------------ plumbing

    def save(self):
        if self.rank == 0:
            (self.out / "bench_window.json").write_text(json.dumps(self.results, indent=1, default=str))

    def left(self) -> float:
        # rank 0's clock decides for the group: ranks that disagreed on skipping a configuration would hang
        return self.from_rank0(torch.tensor([self.args.budget_s - (time.perf_counter() - self.started)])).item()

    def from_rank0(self, t: torch.Tensor) -> torch.Tensor:
        """t overwritten in place with rank 0's value (alone: t as it is)."""
        if self.world > 1:
            on_device = t.to(self.device)  # NCCL moves GPU tensors only
            dist.broadcast(on_device, src=0)
            t.copy_(on_device)
        return t

    def slowest(self, values: dict) -> dict:
        """Each value's maximum over the ranks: a phase of the group lasts as long as on its slowest rank."""
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(values, t.tolist(), strict=True))

    def together(self):
        """Start the ranks together (alone: just synchronise)."""
        self.sync()
        if self.world > 1:
            dist.barrier()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> dict:
        self.sync()
        if not self.cuda:
            return {}
        return {"peak_gib": torch.cuda.max_memory_allocated() / GiB, "reserved_gib": torch.cuda.max_memory_reserved() / GiB}

    def allocated(self) -> float | None:
        self.sync()
        return torch.cuda.memory_allocated() / GiB if self.cuda else None

    def step(self, name, fn, *a, **kw):
        """Run one part; record its failure and go on (in a group, stop: the ranks that did not fail
        would wait for the failed one in their next collective)."""
        t0 = time.perf_counter()
        print(f"[{name}] start at {t0 - self.started:.0f} s", flush=True)
        try:
            return fn(*a, **kw)
        except Exception as exc:
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            print(f"[{name}] FAILED: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            if self.world > 1:
                raise
            return None
        finally:
            print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
            self.save()

    # ------------------------------------------------------------------ inputs and models

    def env(self):
        info = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": str(self.device), "tiny": self.args.tiny, "command": " ".join(sys.argv), "sp": self.world,
            "window": [self.frames_n, self.motion_n, self.height, self.width], "cpus": os.cpu_count(),
            "compile_problem": compile_problem(self.device), "offload_problem": offload_problem(self.device),
            "attention": attention.describe(attention.get_attention(self.args.attention, self.device)),
        }
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            info |= {"gpu": props.name, "memory_gib": props.total_memory / GiB,
                     "free_gib_at_start": torch.cuda.mem_get_info()[0] / GiB}
        try:
            import diffusers
            info["diffusers"] = diffusers.__version__
        except Exception:
            pass
        info["host"] = host_status()
        self.results["env"] = info
        print(json.dumps(info), flush=True)

    def make_inputs(self):
        cfg, gen = self.cfg, torch.Generator().manual_seed(0)
        window = Window(index=1, start=self.frames_n - self.motion_n, length=self.frames_n, motion=self.motion_n)
        self.window = window
        self.inputs = JobInputs(
            num_frames=window.end,
            text=torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen),
            text_null=torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen),
            audio=torch.randn(1, window.end + 3, cfg.audio_layers, cfg.audio_dim, generator=gen),
            references=torch.rand(1, 3, self.height, self.width, generator=gen) * 2 - 1,
            clip_tokens=torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=gen),
            masks=None,
        )
        self.settings = RenderSettings(
            window=self.frames_n, motion=self.motion_n, scheduler="flowmatch_distill", steps=4, shift=7.0,
            text_scale=1.0, audio_scale=1.0, size=f"{self.width}x{self.height}",
        )
        m = latent_frames(self.motion_n)
        self.motion = torch.randn(1, 16, m, self.height // 8, self.width // 8, generator=gen)
        for t in (self.inputs.text, self.inputs.text_null, self.inputs.audio, self.inputs.references,
                  self.inputs.clip_tokens, self.motion):
            self.from_rank0(t)

    def make_vae(self):
        t0 = time.perf_counter()
        module = AutoencoderKLWan(**(TINY_VAE if self.args.tiny else {}))
        self.vae_module = module.to(self.device, torch.bfloat16).eval().requires_grad_(False)
        for p in module.parameters():  # initialised from the unseeded global RNG
            self.from_rank0(p.data)
        self.results["vae"] = {"params": sum(p.numel() for p in module.parameters()), "build_s": time.perf_counter() - t0}

    def laid_out_vae_module(self):
        """A copy of the VAE's module for apply_vae_layout, which pads it in place (the tiled
        configurations need the module as built); one for all configurations, so that compiled VAE
        graphs are reused (a second apply_vae_layout on it changes nothing)."""
        if not hasattr(self, "_laid_out_vae_module"):
            self._laid_out_vae_module = copy.deepcopy(self.vae_module)
        return self._laid_out_vae_module

    def build(self, quant: str):
        """The DiT in bf16 on the device (bench_dit's builder); quant 'fp8' quantises its block linears."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        model = self.dit_bench.build_model()
        for p in model.parameters():  # one set of weights on every rank, whatever each rank's RNG did
            self.from_rank0(p.data)
        apply_attention(model, self.args.attention, self.device)
        if quant != "none":
            fp8.apply_fp8(model, quant, self.device)
            if self.cuda:
                torch.cuda.empty_cache()
        self.results.setdefault("builds", {})[quant] = {
            "allocated_gib": self.allocated(), "host": host_status(),
            "param_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GiB,
        }
        return model

    # ------------------------------------------------------------------ one configuration

    def configure(self, label, model, memory, quant, state):
        """Bring `model` to the configuration's settings; `state` carries what earlier ones applied."""
        if quant != state.get("quant"):
            fp8.apply_fp8(model, quant, self.device)  # fp8 layers switch mode in place
            state["quant"] = quant
        if memory.compile and not state.get("compiled"):
            state["compiled"] = compile_blocks(model, self.device)
        if memory.offload and "offload" not in state:
            t0 = time.perf_counter()
            state["offload"] = offload_blocks(model, self.device, memory.offload_ahead)
            self.sync()
            state["offload_s"] = time.perf_counter() - t0
            state["h2d"] = self.h2d_rate(state["offload"])
        if memory.offload:
            state["offload"].ahead = memory.offload_ahead
        if self.world > 1 and "sp" not in state:  # last, as the farm applies it to the loaded model
            state["sp"] = apply_sequence_parallel(model)
        if self.cuda:
            torch.cuda.empty_cache()

    def h2d_rate(self, offload) -> dict:
        """One block's host-to-device copy, alone: GB/s from page-locked memory."""
        host = offload.weights[0].host
        buffer = torch.empty_like(host, device=self.device)
        buffer.copy_(host, non_blocking=True)
        self.sync()
        t0 = time.perf_counter()
        for _ in range(5):
            buffer.copy_(host, non_blocking=True)
        self.sync()
        seconds = (time.perf_counter() - t0) / 5
        del buffer
        return {"block_gib": host.numel() / GiB, "ms": seconds * 1e3, "gb_s": host.numel() / seconds / 1e9,
                "pinned": bool(host.is_pinned())}

    def run_config(self, label, model, memory, quant, state, conditioning: str):
        """conditioning: 'measure' (encode it with this configuration's VAE) or 'reuse'."""
        self.configure(label, model, memory, quant, state)
        entry = self.results["configs"].setdefault(label, {})
        entry["settings"] = {"memory": repr(memory), "quant": quant}
        entry["resident_gib"] = self.allocated()
        entry["host_before"] = host_status()
        if "offload" in state:
            entry["offload"] = {"host_gib": state["offload"].host_bytes / GiB, "ahead": state["offload"].ahead,
                                "setup_s": state.get("offload_s"), "h2d": state.get("h2d")}
        laid_out = memory.vae_tiling is None and self.cuda  # prepare_vae lays it out: on a copy
        vae = WanVAE(self.laid_out_vae_module() if laid_out else self.vae_module, memory.vae_tiling)
        prepare_vae(vae, memory)  # as the renderers do (pipeline.assemble)
        renderer = WindowRenderer(Models(dit=model, vae=vae), self.inputs, self.settings, seed=0)
        if conditioning == "measure" or not hasattr(self, "conditioning"):
            self.together()
            self.reset_peak()
            t0 = time.perf_counter()
            renderer.conditioning(0, self.frames_n)
            self.sync()
            entry["conditioning_per_job"] = self.slowest({"s": time.perf_counter() - t0, **self.peaks()})
            # every window renders from the first latent measured (untiled), so that the final latents of
            # the configurations compare the DiT alone
            self.__dict__.setdefault("conditioning", renderer._conditioning[0])
        renderer._conditioning[0] = self.conditioning

        # warm-up: one DiT forward at the window's shapes, as render() calls it
        window = self.window
        y = renderer.conditioning(0, window.length).to(renderer.device, renderer.dtype)
        clip_tokens = self.inputs.clip_tokens[:1].to(renderer.device)
        audio = torch.stack([window_audio(t, window) for t in self.inputs.audio])[None].to(renderer.device)
        gen = torch.Generator().manual_seed(0)  # the same on every rank
        x = torch.randn(1, 16, latent_frames(window.length), *y.shape[-2:], generator=gen).to(renderer.device)
        compiled_before = dict(state["compiled"].shapes) if state.get("compiled") else {}
        self.together()
        self.reset_peak()
        t0 = time.perf_counter()
        with torch.no_grad():
            renderer.velocity(x, 999.0, y, clip_tokens, audio, None)
        self.sync()
        entry["warmup_forward"] = self.slowest({"s": time.perf_counter() - t0, **self.peaks()})
        if state.get("compiled"):
            new = {str(k[0][0]): v for k, v in state["compiled"].shapes.items() if k not in compiled_before}
            entry["warmup_forward"]["compiled_now"] = new
        if memory.compile:  # the compiled VAE decode's graphs at this shape, outside the timed window
            self.together()
            t0 = time.perf_counter()
            vae.decode(torch.zeros_like(x))
            self.sync()
            entry["warmup_decode"] = self.slowest({"s": time.perf_counter() - t0})
        del x, y, audio

        # the window (run `repeat` times; the phases kept are the last run's)
        all_s = []
        for _ in range(self.args.repeat):
            phases, frames, motion, window_s = self.window_once(label, renderer, vae)
            all_s.append(window_s)

        entry["phases"] = phases
        entry["window_s"] = window_s
        entry["window_s_all"] = all_s
        entry["dit_s_per_forward"] = phases["dit"]["s"] / self.settings.steps
        if self.cuda:
            entry["peak_gib"] = max(p["peak_gib"] for p in phases.values())
            entry["reserved_gib"] = max(p["reserved_gib"] for p in phases.values())
        entry["host_after"] = host_status()
        entry["finite"] = bool(torch.isfinite(frames).all()) and bool(torch.isfinite(motion).all())
        if self.world > 1:
            entry["ranks_max_abs_diff"] = {"latents": self.rank_difference(self.latents[label]),
                                           "motion": self.rank_difference(motion)}
        self.frames[label] = frames[:: max(1, len(frames) // 8)].float().cpu()
        print(f"  {label}: window {window_s:.2f} s (all {[round(t, 2) for t in all_s]}), phases "
              f"{ {k: round(v['s'], 2) for k, v in phases.items()} }, peak {entry.get('peak_gib', 0):.2f} GiB "
              f"(reserved {entry.get('reserved_gib', 0):.2f}), host {entry['host_after']}"
              + (f", ranks' max abs diff {entry['ranks_max_abs_diff']}" if self.world > 1 else ""), flush=True)
        del frames, motion, renderer
        return entry

    def rank_difference(self, t: torch.Tensor) -> float:
        """max |t - rank 0's t| over the elements and the ranks."""
        own = t.detach().float().to(self.device)
        difference = (own - self.from_rank0(own.clone())).abs().max()
        dist.all_reduce(difference, op=dist.ReduceOp.MAX)
        return difference.item()

    def window_once(self, label, renderer, vae):
        window = self.window
        phases = {}
        decode = vae.decode
        marks = {}

        def timed_decode(latents):
            self.sync()
            marks["dit_end"] = time.perf_counter()
            phases["dit"] = {"s": marks["dit_end"] - marks["start"], **self.peaks()}
            self.latents[label] = latents.detach().float().cpu()
            self.reset_peak()
            out = decode(latents)
            self.sync()
            phases["decode"] = {"s": time.perf_counter() - marks["dit_end"], **self.peaks()}
            return out

        vae.decode = timed_decode
        reset_host_peak()
        self.together()
        self.reset_peak()
        marks["start"] = time.perf_counter()
        frames = renderer.render(window, self.motion, StageClock(self.device))  # its own phases are timed here
        vae.decode = decode

        self.reset_peak()
        t0 = time.perf_counter()
        frames = match_colors(frames, self.inputs.references[0].to(frames.device), "mkl", 1.0)
        self.sync()
        phases["colour"] = {"s": time.perf_counter() - t0, **self.peaks()}

        self.reset_peak()
        t0 = time.perf_counter()
        motion = vae.encode(frames[-self.motion_n:].transpose(0, 1)[None])
        self.sync()
        phases["motion_encode"] = {"s": time.perf_counter() - t0, **self.peaks()}
        window_s = self.slowest({"s": time.perf_counter() - marks["start"]})["s"]
        return {k: self.slowest(v) for k, v in phases.items()}, frames, motion, window_s

    def extra_decode(self, label, tiling):
        """A decode of the last window's latent with another VAE tiling: its time and peak alone."""
        vae = WanVAE(self.vae_module, tiling)
        latents = self.latents[label].to(self.device)
        self.reset_peak()
        t0 = time.perf_counter()
        vae.decode(latents)
        self.sync()
        entry = {"tiling": repr(tiling), "s": time.perf_counter() - t0, **self.peaks()}
        self.results["configs"][label].setdefault("extra_decodes", []).append(entry)
        print(f"  {label} extra decode {entry}", flush=True)
        WanVAE(self.vae_module, None)  # leave the module untiled

    def benchmark_decode(self, label, tiling):
        """The last window's decode again with cuDNN's convolution autotuning on (the first call tunes)."""
        vae = WanVAE(self.vae_module, tiling)
        latents = self.latents[label].to(self.device)
        torch.backends.cudnn.benchmark = True
        try:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                vae.decode(latents)
                self.sync()
                times.append(time.perf_counter() - t0)
        finally:
            torch.backends.cudnn.benchmark = False
        self.results["configs"][label]["decode_cudnn_benchmark_s"] = times
        print(f"  {label} decode with cudnn.benchmark: {[round(t, 2) for t in times]} s", flush=True)

    def compare(self):
        """Relative L2 distance of the final latents (and sampled frames) between configurations."""
        out = {}
        labels = list(self.latents)
        base = "fast/bf16" if "fast/bf16" in self.latents else (labels[0] if labels else None)
        for label in labels:
            if label == base:
                continue
            a, b = self.latents[label], self.latents[base]
            out[f"{label} vs {base}"] = {"latent": rel(a, b), "frames": rel(self.frames[label], self.frames[base])}
        pairs = [("24gb/bf16", "fast/bf16"), ("12gb/fp8", "fast/fp8"), ("24gb/fp8", "fast/fp8"), ("24gb/fp8", "12gb/fp8")]
        for x, y in pairs:
            if x in self.latents and y in self.latents:
                out[f"{x} vs {y}"] = {"latent": rel(self.latents[x], self.latents[y]),
                                      "frames": rel(self.frames[x], self.frames[y])}
        self.results["compare"] = out
        for k, v in out.items():
            print(f"  compare {k}: {v}", flush=True)

    # ------------------------------------------------------------------ all

    def plan(self):
        """(build quant, [(label, memory preset, quant mode, conditioning, extra decode tilings)])."""
        fp8_mode = "fp8" if "fp8" in fp8.available_modes(self.device) else "fp8_weights"
        offload_ok = offload_problem(self.device) is None
        compile_ok = compile_problem(self.device) is None
        bf16 = [("fast/bf16", "fast", "none", "measure", [])]
        if offload_ok:
            bf16.append(("24gb/bf16", "24gb", "none", "measure", [VAETiling()]))  # the tiled decode, for reference
        q = [(f"fast/{fp8_mode}", "fast", fp8_mode, "reuse", [])]
        if offload_ok:
            q += [("12gb/fp8_weights", "12gb", "fp8_weights", "reuse", [])]
            if fp8_mode == "fp8":
                q += [("12gb/fp8", "12gb", "fp8", "reuse", []), ("24gb/fp8", "24gb", "fp8", "reuse", [])]
        if not compile_ok:  # then only the eager default runs here
            bf16 = [("none/bf16", "none", "none", "measure", [])]
            q = [(f"none/{fp8_mode}", "none", fp8_mode, "reuse", [])]
        plan = [("none", bf16), (fp8_mode, q)]
        if self.args.only:
            wanted = self.args.only.split(",")
            plan = [(b, [c for c in cs if c[0] in wanted]) for b, cs in plan]
        if self.args.sp > 1:  # the presets without block offload (asked for by name, __main__ refuses them)
            sp = self.args.sp
            plan = [(b, [(f"{c[0]}/sp{sp}", *c[1:]) for c in cs if not preset(c[1], c[2])[0].offload]) for b, cs in plan]
        return [(b, cs) for b, cs in plan if cs]

    def main(self):
        self.step("env", self.env)
        self.step("inputs", self.make_inputs)
        self.step("vae", self.make_vae)
        for build_quant, configs in self.plan():
            if self.left() < 0:
                self.results["errors"][f"build {build_quant}"] = "skipped: time budget spent"
                continue
            model = self.step(f"build {build_quant}", self.build, build_quant)
            if model is None:
                continue
            state = {"quant": build_quant}
            for label, memory_name, quant, conditioning, extra in configs:
                if self.left() < 0:
                    self.results["errors"][label] = f"skipped: time budget ({self.args.budget_s} s) spent"
                    print(f"[{label}] skipped (budget)", flush=True)
                    continue
                memory, quant = preset(memory_name, quant)
                if self.step(label, self.run_config, label, model, memory, quant, state, conditioning) is None:
                    continue
                for tiling in extra:
                    self.step(f"{label} extra decode", self.extra_decode, label, tiling)
                if self.args.cudnn_benchmark_decode:
                    self.step(f"{label} cudnn.benchmark decode", self.benchmark_decode, label, memory.vae_tiling)
            del model, state
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            self.results.setdefault("after_cleanup", {})[build_quant] = {"host": host_status(), "allocated_gib": self.allocated()}
        self.step("compare", self.compare)
        self.results["total_s"] = time.perf_counter() - self.started
        self.save()
        summary(self.results)


def group_member(rank: int, world: int, args) -> None:
    """One rank of --sp (in a process of its own); only rank 0 prints, the others would repeat it."""
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet if rank else sys.stdout):
        WindowBench(args, rank, world).main()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def summary(results):
    print("\n=== one window (seconds; peak GPU GiB allocated / reserved; host RSS GiB) ===")
    print(f"{'config':20s} {'window':>7s} {'DiT':>6s} {'/fwd':>5s} {'decode':>6s} {'colour':>6s} {'enc':>5s} "
          f"{'peak':>6s} {'resv':>6s} {'DiT pk':>6s} {'dec pk':>6s} {'host':>6s}")
    for label, r in results["configs"].items():
        if "phases" not in r:
            continue
        p = r["phases"]
        print(f"{label:20s} {r['window_s']:7.2f} {p['dit']['s']:6.2f} {r['dit_s_per_forward']:5.2f} {p['decode']['s']:6.2f} "
              f"{p['colour']['s']:6.2f} {p['motion_encode']['s']:5.2f} {r.get('peak_gib', math.nan):6.2f} "
              f"{r.get('reserved_gib', math.nan):6.2f} {p['dit'].get('peak_gib', math.nan):6.2f} "
              f"{p['decode'].get('peak_gib', math.nan):6.2f} {r['host_after'].get('VmHWM', math.nan):6.1f}")
        if "ranks_max_abs_diff" in r:
            print(f"{'':20s} ranks' max abs difference: {r['ranks_max_abs_diff']}")
    if results["errors"]:
        print("errors:", {k: v.splitlines()[0] for k, v in results["errors"].items()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-size model and window (CPU is fine)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--budget-s", type=float, default=420, help="skip configurations that would start after this")
    parser.add_argument("--only", default="", help="comma-separated configuration labels to run (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="timed windows per configuration")
    parser.add_argument("--attention", default="sdpa", help="attention backend of the DiT (pipeline.kernels.attention)")
    parser.add_argument("--cudnn-benchmark-decode", action="store_true",
                        help="after each configuration, time its decode again with torch.backends.cudnn.benchmark on")
    parser.add_argument("--sp", type=int, default=1,
                        help="Ulysses sequence parallelism over this many GPUs (CPU processes without CUDA)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args = parser.parse_args()
    if args.sp == 1:
        WindowBench(args).main()
    else:
        cuda = torch.cuda.is_available()
        if cuda and torch.cuda.device_count() < args.sp:
            raise SystemExit(f"--sp {args.sp} needs {args.sp} GPUs, {torch.cuda.device_count()} visible")
        offloaded = [label for label in args.only.split(",") if label and preset(label.split("/")[0], "none")[0].offload]
        if offloaded:
            raise SystemExit(f"--sp {args.sp}: block offload is not combined with sequence parallelism; "
                             f"choose presets without it (not {', '.join(offloaded)})")
        run_group(group_member, args.sp, cuda, args)
