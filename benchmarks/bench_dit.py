"""One DiT forward of the 14B InfiniteTalk model on one GPU: speed, memory, precision, profile.

    python benchmarks/bench_dit.py --out DIR            # the full 14B on CUDA (random weights)
    python benchmarks/bench_dit.py --tiny --out DIR     # the same code at toy size (CPU is fine)

Sections, in order (each result is written to DIR/bench_dit.json as soon as it exists, so a run cut
short still leaves what it measured):
  env        device, torch, sageattention versions
  attention  SDPA's cuDNN / flash / efficient kernels and sageattention at the DiT's four attention
             shapes (self L=46,800; text 512 keys; CLIP 257 keys; audio 30 frames x 1,560 -> 32 keys):
             median ms, TFLOP/s, and error against an fp32 reference on a subset of queries
  gemm       bf16 linear vs fp8 (_scaled_mm, per-token x per-channel scales) at the big layer shapes,
             with the activation quantiser eager and compiled; error against fp32
  model      the full architecture (DiTConfig() defaults) built on the meta device and materialised
             on the GPU in bf16 (fp32 where `keeps_fp32`), random weights, no host copy
  runs       one forward at 117 frames (latent 30x60x104 -> 46,800 tokens) and 81 frames, for
             bf16+sdpa, bf16+sage, fp8+sdpa, fp8+sage, fp8_weights+sdpa: warm-up, then the median of
             timed runs (CUDA events), peak memory (torch.cuda.max_memory_allocated); the warm-up of
             each 117-frame run records every block's output (every 8th token) for the quality guard
  quality    relative error of every block's output and of the velocity vs bf16+sdpa
  fp8_groups which block linears to keep in bf16: block 0 and 20 outputs with one group of linears in
             fp8 at a time, on the activations the model actually feeds them
  profile    torch.profiler over one forward (bf16+sdpa, fp8+sdpa): kernels by GPU time
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import attention, fp8  # noqa: E402
from pipeline.kernels.attention import apply_attention, sdpa_with  # noqa: E402
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT, keeps_fp32  # noqa: E402

GiB = 2**30
TINY = DiTConfig(
    dim=256, ffn_dim=512, num_heads=2, num_layers=3, text_dim=64, clip_dim=32, text_len=32, freq_dim=32,
    audio_dim=32, audio_layers=3, audio_hidden=32, audio_tokens=8,
)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.cfg = TINY if args.tiny else DiTConfig()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"errors": {}}
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ plumbing

    def save(self):
        (self.out / "bench_dit.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, name, fn, *a, **kw):
        left = self.args.budget_s - (time.perf_counter() - self.started)
        if left < 0:
            self.results["errors"][name] = f"skipped: time budget ({self.args.budget_s} s) spent"
            print(f"[{name}] skipped (budget)", flush=True)
            return None
        t0 = time.perf_counter()
        print(f"[{name}] start at {t0 - self.started:.0f} s", flush=True)
        try:
            return fn(*a, **kw)
        except Exception as exc:  # record, go on with the next section
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            print(f"[{name}] FAILED: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            return None
        finally:
            print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
            if self.cuda:
                torch.cuda.empty_cache()
            self.save()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, warmup=1, reps=5) -> list[float]:
        return time_ms(fn, warmup, reps, self.cuda)

    def randn(self, *shape, dtype=torch.bfloat16, gen=None):
        return torch.randn(*shape, device=self.device, dtype=torch.float32, generator=gen).to(dtype)

    # ------------------------------------------------------------------ env

    def env(self):
        info = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": str(self.device), "tiny": self.args.tiny, "command": " ".join(sys.argv),
            "sdpa_pinned": attention.SDPA_CUDA_KERNEL,
        }
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            info |= {"gpu": props.name, "capability": list(torch.cuda.get_device_capability()),
                     "sms": props.multi_processor_count, "memory_gib": props.total_memory / GiB}
        try:
            from importlib.metadata import version
            info["sageattention"] = version("sageattention")
            import triton
            info["triton"] = triton.__version__
        except Exception as exc:
            info["sageattention"] = f"unavailable: {exc}"
        info["attention_available"] = attention.available_attention(self.device)
        info["quant_available"] = fp8.available_modes(self.device)
        self.results["env"] = info
        print(json.dumps(info), flush=True)

    # ------------------------------------------------------------------ attention kernels

    def attention_shapes(self):
        cfg, h, d = self.cfg, self.cfg.num_heads, self.cfg.head_dim
        tokens = 46_800 if not self.args.tiny else 30 * 8
        frames = 30 if not self.args.tiny else 3
        return {  # name: (B, Lq, Lk, H, D)
            "self": (1, tokens, tokens, h, d),
            "text": (1, tokens, cfg.text_len, h, d),
            "image": (1, tokens, cfg.clip_tokens, h, d),
            "audio": (frames, tokens // frames, cfg.audio_tokens, h, d),
        }

    def attention_kernels(self):
        gen = torch.Generator(self.device).manual_seed(0)
        kernels = {f"sdpa_{k}": sdpa_with(k) for k in attention.SDPA_CUDA_KERNELS} if self.cuda else {"sdpa": sdpa_with(None)}
        if "sage" in attention.available_attention(self.device):
            sageattn = attention._import_sage()
            kernels["sage_raw"] = lambda q, k, v: sageattn(q.to(v.dtype), k.to(v.dtype, copy=True), v, tensor_layout="NHD")
            kernels["sage"] = attention.sage_attention
        res = self.results.setdefault("attention", {})
        for shape_name, (b, lq, lk, h, d) in self.attention_shapes().items():
            q = self.randn(b, lq, h, d, dtype=torch.float32, gen=gen)  # as after RoPE
            k = self.randn(b, lk, h, d, dtype=torch.float32, gen=gen)
            v = self.randn(b, lk, h, d, gen=gen)
            # fp32 reference on a subset of queries (every query of the short shapes is too many for fp32 logits)
            sub = torch.arange(0, lq, max(1, lq // 512), device=self.device)
            qs, kb, vb = q[:, sub].to(torch.bfloat16).float(), k.to(torch.bfloat16).float(), v.float()
            logits = torch.einsum("blhd,bmhd->bhlm", qs, kb) / math.sqrt(d)
            ref = torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), vb)
            del logits
            flops = 4 * b * h * lq * lk * d
            for name, fn in kernels.items():
                entry = {}
                try:
                    out = fn(q, k, v)
                    entry["rel_err_vs_fp32"] = rel_err(out[:, sub], ref)
                    del out
                    reps = 5 if shape_name == "self" else 10
                    times = self.time_ms(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), warmup=1, reps=reps)
                    entry["ms"] = statistics.median(times)
                    entry["tflops"] = flops / entry["ms"] / 1e9
                except Exception as exc:
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                res.setdefault(shape_name, {})[name] = entry
                print(f"  attention {shape_name:6s} {name:16s} {entry}", flush=True)
                self.save()
            del q, k, v, ref

    def choose_sdpa_kernel(self):
        """The fastest SDPA kernel that runs every shape within bf16 error; patch the library's
        `sdpa` to it if it is not the pinned one (and say so)."""
        res = self.results.get("attention", {})
        if not self.cuda or not res:
            return
        good = []
        for kernel in attention.SDPA_CUDA_KERNELS:
            entries = [res[s].get(f"sdpa_{kernel}", {}) for s in res]
            if all("ms" in e and e["rel_err_vs_fp32"] < 2e-2 for e in entries):
                good.append((res["self"][f"sdpa_{kernel}"]["ms"], kernel))
        best = min(good)[1] if good else None
        self.results["sdpa_choice"] = {"pinned": attention.SDPA_CUDA_KERNEL, "fastest_correct": best}
        if best and best != attention.SDPA_CUDA_KERNEL:
            print(f"  sdpa: using {best} instead of the pinned {attention.SDPA_CUDA_KERNEL}", flush=True)
            attention.SDPA_CUDA_KERNEL = best
            attention.sdpa_attention = attention.BACKENDS["sdpa"] = sdpa_with(best)
        self.results["sdpa_choice"]["used"] = attention.SDPA_CUDA_KERNEL

    # ------------------------------------------------------------------ GEMMs

    def gemms(self):
        gen = torch.Generator(self.device).manual_seed(1)
        tokens = 46_800 if not self.args.tiny else 240
        dim, ffn = self.cfg.dim, self.cfg.ffn_dim
        res = self.results.setdefault("gemm", {})
        for k_in, n_out in ((dim, dim), (dim, ffn), (ffn, dim)):
            key = f"{tokens}x{k_in}->{n_out}"
            entry = res.setdefault(key, {})
            x = self.randn(tokens, k_in, gen=gen)
            w = self.randn(n_out, k_in, gen=gen) * 0.02
            bias = self.randn(n_out, gen=gen) * 0.02
            flops = 2 * tokens * k_in * n_out
            sub = slice(0, tokens, max(1, tokens // 1024))
            ref = x[sub].float() @ w.float().T + bias.float()
            entry["bf16_ms"] = statistics.median(self.time_ms(lambda x=x, w=w, b=bias: F.linear(x, w, b), reps=10))
            entry["bf16_tflops"] = flops / entry["bf16_ms"] / 1e9
            entry["bf16_rel_err"] = rel_err(F.linear(x[sub], w, bias), ref)
            wq, ws = fp8.quantise_weight(w)
            entry["fp8_weight_rel_err"] = rel_err(fp8.dequantise_weight(wq, ws, torch.float32), w.float())
            if "fp8" not in fp8.available_modes(self.device):
                entry["fp8"] = "unavailable here"
                continue
            xq, xs = fp8.quantise_rows(x)
            for fast in (False, True):
                def mm(xq=xq, wq=wq, xs=xs, ws=ws, bias=bias, fast=fast):
                    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), bias=bias,
                                            out_dtype=torch.bfloat16, use_fast_accum=fast)
                tag = "fp8_mm_fastacc" if fast else "fp8_mm"
                entry[f"{tag}_ms"] = statistics.median(self.time_ms(mm, reps=10))
                entry[f"{tag}_tflops"] = flops / entry[f"{tag}_ms"] / 1e9
                entry[f"{tag}_rel_err"] = rel_err(mm()[sub], ref)
            entry["quant_eager_ms"] = statistics.median(self.time_ms(lambda x=x: fp8.quantise_rows(x), reps=10))
            try:
                compiled = fp8._quantiser() if fp8.COMPILE_QUANTISER else None
                if compiled is not None:
                    t0 = time.perf_counter()
                    cq, cs = compiled(x)
                    entry["quant_compile_first_call_s"] = time.perf_counter() - t0
                    entry["quant_compiled_equal_eager"] = bool(torch.equal(cq.view(torch.uint8), xq.view(torch.uint8)) and torch.equal(cs, xs))
                    entry["quant_compiled_ms"] = statistics.median(self.time_ms(lambda c=compiled, x=x: c(x), reps=10))
            except Exception as exc:
                entry["quant_compiled_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            entry["fp8_linear_ms"] = statistics.median(self.time_ms(lambda x=x, wq=wq, ws=ws, b=bias: fp8.fp8_matmul(x, wq, ws, b), reps=10))
            entry["fp8_linear_rel_err"] = rel_err(fp8.fp8_matmul(x[sub], wq, ws, bias), ref)
            print(f"  gemm {key}: {entry}", flush=True)
            del x, w, xq, wq
        # _scaled_mm at the small-M shapes the model also has (context 769/512/257, audio 960)
        if "fp8" in fp8.available_modes(self.device):
            for m in (257, 512, 960, 1, 17):
                x = self.randn(m, dim, gen=gen)
                w = self.randn(dim, dim, gen=gen) * 0.02
                wq, ws = fp8.quantise_weight(w)
                try:
                    out = fp8.fp8_matmul(x, wq, ws, None)
                    res[f"small_m_{m}"] = {"rel_err": rel_err(out, x.float() @ w.float().T)}
                except Exception as exc:
                    res[f"small_m_{m}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    # ------------------------------------------------------------------ model

    def build_model(self):
        """Meta build, then each parameter materialised on the device in its dtype and initialised
        there: small normal weights (std 0.02), modulation std 1/sqrt(dim), norms at identity."""
        torch.cuda.reset_peak_memory_stats() if self.cuda else None
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = WanInfiniteTalkDiT(self.cfg)
        gen = torch.Generator(self.device).manual_seed(1234)
        for name, p in list(model.named_parameters()):
            dtype = torch.float32 if keeps_fp32(name) else torch.bfloat16
            t = torch.empty(p.shape, dtype=dtype, device=self.device)
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(part.startswith("norm") for part in name.split(".")) or name.startswith(("img_emb.proj.0.", "img_emb.proj.4."))
            if is_norm:
                t.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "modulation":
                t.normal_(0, 1 / math.sqrt(self.cfg.dim), generator=gen)
            else:
                t.normal_(0, 0.02, generator=gen)
            owner_name, _, leaf_name = name.rpartition(".")
            model.get_submodule(owner_name)._parameters[leaf_name] = nn.Parameter(t, requires_grad=False)
        model.eval()
        self.sync()
        n = sum(p.numel() for p in model.parameters())
        self.results["model"] = {
            "params": n, "build_s": time.perf_counter() - t0,
            "param_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GiB,
            "allocated_gib": torch.cuda.memory_allocated() / GiB if self.cuda else None,
        }
        print(f"  model: {self.results['model']}", flush=True)
        return model

    def inputs(self, frames: int):
        gen = torch.Generator(self.device).manual_seed(frames)
        cfg = self.cfg
        f = (frames - 1) // 4 + 1
        h, w = (60, 104) if not self.args.tiny else (8, 8)
        return dict(
            x=self.randn(1, 16, f, h, w, dtype=torch.float32, gen=gen),
            t=torch.tensor([500.0], device=self.device),
            text=self.randn(1, cfg.text_len, cfg.text_dim, dtype=torch.float32, gen=gen),
            clip_tokens=self.randn(1, cfg.clip_tokens, cfg.clip_dim, dtype=torch.float32, gen=gen),
            y=self.randn(1, 20, f, h, w, dtype=torch.float32, gen=gen),
            audio=self.randn(1, 1, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, dtype=torch.float32, gen=gen),
        )

    # ------------------------------------------------------------------ forward runs

    def capture_hooks(self, model, store: list):
        def hook(_module, _args, output):
            store.append(output[:, ::8].detach().clone())
        return [b.register_forward_hook(hook) for b in model.blocks]

    def run(self, model, label: str, frames: int, reps: int, capture: bool):
        inputs = self.inputs(frames)
        blocks: list = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        handles = self.capture_hooks(model, blocks) if capture else []
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(**inputs)
            self.sync()
            warm_s = time.perf_counter() - t0
            for h in handles:
                h.remove()
            finite = bool(torch.isfinite(out).all())
            times = self.time_ms(lambda: model(**inputs), warmup=0, reps=reps)
        entry = {
            "frames": frames, "tokens": math.prod(out.shape[2:]) // 4, "ms_median": statistics.median(times),
            "ms_all": times, "warmup_s": warm_s, "finite": finite,
            "peak_gib": torch.cuda.max_memory_allocated() / GiB if self.cuda else None,
        }
        self.results.setdefault("runs", {})[f"{label}@{frames}"] = entry
        print(f"  run {label}@{frames}: {entry}", flush=True)
        return out, blocks

    def quality(self, label, out, blocks):
        ref_out, ref_blocks = self.reference
        entry = {
            "velocity_rel_err": rel_err(out, ref_out),
            "block_rel_err": [rel_err(b, r) for b, r in zip(blocks, ref_blocks)],
        }
        self.results.setdefault("quality", {})[label] = entry
        print(f"  quality {label}: velocity {entry['velocity_rel_err']:.4f}, blocks {[round(e, 4) for e in entry['block_rel_err']]}", flush=True)

    def config(self, model, label, frames_list, reps):
        """Time one configuration at each frame count; the first (117) also feeds the quality guard."""
        for i, frames in enumerate(frames_list):
            capture = i == 0
            out, blocks = self.run(model, label, frames, reps, capture)
            if capture:
                if label == "bf16+sdpa":
                    self.reference = (out, blocks)
                else:
                    self.quality(label, out, blocks)
            del out, blocks

    # ------------------------------------------------------------------ which linears stay bf16

    def capture_block_inputs(self, model, indices, frames):
        saved = {}

        def pre(i):
            def hook(_module, args, kwargs):
                saved[i] = (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), kwargs)
            return hook

        handles = [model.blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in indices]
        with torch.inference_mode():
            model(**self.inputs(frames))
        for h in handles:
            h.remove()
        return saved

    FP8_GROUPS = {
        "self_attn.qkvo": r"self_attn\.(q|k|v|o)$",
        "cross_attn.q,o": r"cross_attn\.(q|o)$",
        "cross_attn.k,v,k_img,v_img": r"cross_attn\.(k|v|k_img|v_img)$",
        "audio.q_linear,proj": r"audio_cross_attn\.(q_linear|proj)$",
        "audio.kv_linear": r"audio_cross_attn\.kv_linear$",
        "ffn.0,2": r"ffn\.(0|2)$",
        "all": r".*",
    }

    def fp8_groups(self, model, frames):
        import re
        mode = "fp8" if "fp8" in fp8.available_modes(self.device) else "fp8_weights"
        indices = [0, self.cfg.num_layers // 2]
        saved = self.capture_block_inputs(model, indices, frames)
        res = self.results.setdefault("fp8_groups", {"mode": mode})
        for i in indices:
            args, kwargs = saved[i]
            # each linear alone: its output with the fp8 weight (and, in 'fp8' mode, fp8 activations)
            # vs bf16, on the input the model gives it
            layer_err = res.setdefault(f"block{i}_layers", {})

            def layer_hook(name, layer_err=layer_err):
                def hook(module, inputs, output):
                    wq, ws = fp8.quantise_weight(module.weight)
                    if mode == "fp8":
                        y = fp8.fp8_matmul(inputs[0], wq, ws, module.bias)
                    else:
                        y = F.linear(inputs[0], fp8.dequantise_weight(wq, ws, module.weight.dtype), module.bias)
                    layer_err[name] = rel_err(y, output)
                return hook

            handles = [m.register_forward_hook(layer_hook(n)) for n, m in model.blocks[i].named_modules()
                       if isinstance(m, nn.Linear) and fp8.fp8_layer(f"blocks.{i}.{n}")]
            with torch.inference_mode():
                ref = model.blocks[i](*args, **kwargs)
            for h in handles:
                h.remove()
            print(f"  fp8 per-layer error block {i}: { {k: round(v, 4) for k, v in layer_err.items()} }", flush=True)
            for group, pattern in self.FP8_GROUPS.items():
                holder = nn.Module()
                holder.blocks = nn.ModuleList([copy.deepcopy(model.blocks[i])])
                select = lambda n, p=re.compile(pattern): fp8.fp8_layer(n) and bool(p.search(n))  # noqa: E731
                fp8.apply_fp8(holder, mode, self.device, select=select)
                with torch.inference_mode():
                    out = holder.blocks[0](*args, **kwargs)
                res.setdefault(f"block{i}", {})[group] = rel_err(out, ref)
                del holder, out
            print(f"  fp8 groups block {i}: {res[f'block{i}']}", flush=True)
        del saved

    # ------------------------------------------------------------------ profile

    def profile(self, model, label, frames):
        inputs = self.inputs(frames)
        with torch.inference_mode():
            model(**inputs)  # warm
            self.sync()
            table = profile_kernels(lambda: model(**inputs), self.cuda)
        self.results.setdefault("profile", {})[f"{label}@{frames}"] = table
        total = table["total_ms"]
        print(f"  profile {label}@{frames}: total {total:.0f} ms; {table['categories_ms']}", flush=True)
        for r in table["top"][:15]:
            print(f"    {r['self_ms']:9.1f} ms {100 * r['self_ms'] / total:5.1f}% x{r['count']:5d} {r['name'][:110]}", flush=True)

    # ------------------------------------------------------------------ all

    def main(self):
        self.section("env", self.env)
        self.section("attention", self.attention_kernels)
        self.section("sdpa_choice", self.choose_sdpa_kernel)
        self.section("gemm", self.gemms)
        model = self.section("model", self.build_model)
        if model is None:
            return
        frames = [117, 81] if not self.args.tiny else [13, 9]
        reps = self.args.reps
        self.reference = None
        apply_attention(model, attention.sdpa_attention)
        self.section("bf16+sdpa", self.config, model, "bf16+sdpa", frames, reps)
        if "sage" in attention.available_attention(self.device):
            apply_attention(model, "sage", self.device)
            self.section("bf16+sage", self.config, model, "bf16+sage", frames, reps)
        else:
            self.results["errors"]["bf16+sage"] = f"sage unavailable on {self.device}"
        apply_attention(model, attention.sdpa_attention)
        self.section("profile bf16+sdpa", self.profile, model, "bf16+sdpa", frames[0])
        self.section("fp8_groups", self.fp8_groups, model, frames[0])
        mode = "fp8" if "fp8" in fp8.available_modes(self.device) else None
        if mode:
            self.section("apply_fp8", self.quantise, model, "fp8")
            self.section("fp8+sdpa", self.config, model, "fp8+sdpa", frames, reps)
            self.section("profile fp8+sdpa", self.profile, model, "fp8+sdpa", frames[0])
            if "sage" in attention.available_attention(self.device):
                apply_attention(model, "sage", self.device)
                self.section("fp8+sage", self.config, model, "fp8+sage", frames, reps)
                apply_attention(model, attention.sdpa_attention)
        else:
            self.results["errors"]["fp8"] = f"mode 'fp8' unavailable on {self.device}: {fp8.fp8_problem('fp8', self.device)}"
            self.section("apply_fp8", self.quantise, model, "fp8_weights")
        self.section("apply_fp8_weights", self.quantise, model, "fp8_weights")
        self.section("fp8_weights+sdpa", self.config, model, "fp8_weights+sdpa", frames[:1], max(1, reps - 1))
        self.results["total_s"] = time.perf_counter() - self.started
        self.save()
        summary(self.results)

    # ------------------------------------------------------------------ follow-up: compiled blocks

    def compile_blocks(self, model):
        """torch.compile each block (one graph shared by the 40 identical blocks): fuses the fp32
        elementwise work (norms, modulation, RoPE, gated residuals) that the eager profile shows."""
        self.eager_blocks = list(model.blocks)
        for i, block in enumerate(self.eager_blocks):
            model.blocks[i] = torch.compile(block, dynamic=False)

    def uncompile_blocks(self, model):
        for i, block in enumerate(self.eager_blocks):
            model.blocks[i] = block

    def followup(self):
        """Second GPU call: the fp8 layer choice (FP8_KEEP) and fast accumulation as the library now has
        them, and compiled blocks as the remedy for the elementwise time the first profile showed."""
        self.section("env", self.env)
        model = self.section("model", self.build_model)
        if model is None:
            return
        f117, f81 = (117, 81) if not self.args.tiny else (13, 9)
        self.reference = None
        apply_attention(model, attention.sdpa_attention)
        self.section("bf16+sdpa", self.config, model, "bf16+sdpa", [f117], 2)
        self.compile_blocks(model)
        self.section("bf16+sdpa+compile", self.config, model, "bf16+sdpa+compile", [f117], self.args.reps)
        self.section("profile bf16+sdpa+compile", self.profile, model, "bf16+sdpa+compile", f117)
        self.uncompile_blocks(model)
        mode = "fp8" if "fp8" in fp8.available_modes(self.device) else "fp8_weights"
        self.section("apply_fp8", self.quantise, model, mode)
        self.section(f"{mode}+sdpa", self.config, model, f"{mode}+sdpa", [f117, f81], self.args.reps)
        self.section("profile fp8", self.profile, model, f"{mode}+sdpa", f117)
        if "sage" in attention.available_attention(self.device):
            apply_attention(model, "sage", self.device)
            self.section(f"{mode}+sage", self.config, model, f"{mode}+sage", [f117], 2)
            apply_attention(model, attention.sdpa_attention)
        self.compile_blocks(model)
        self.section(f"{mode}+sdpa+compile", self.config, model, f"{mode}+sdpa+compile", [f117], 2)
        self.uncompile_blocks(model)
        self.results["total_s"] = time.perf_counter() - self.started
        self.save()
        summary(self.results)

    # ------------------------------------------------------------------ 8-bit attention

    def int8fp8(self):
        """The int8fp8 attention backend in the whole forward, eager and with compiled blocks, bf16 and
        fp8 linears, against sdpa (cuDNN); quality against eager bf16+sdpa."""
        self.section("env", self.env)
        model = self.section("model", self.build_model)
        if model is None:
            return
        f117, f81 = (117, 81) if not self.args.tiny else (13, 9)
        backend = "int8fp8" if "int8fp8" in attention.available_attention(self.device) else "sdpa"
        self.reference = None
        apply_attention(model, attention.sdpa_attention)
        self.section("bf16+sdpa", self.config, model, "bf16+sdpa", [f117], 1)
        apply_attention(model, backend, self.device)
        self.section(f"bf16+{backend}", self.config, model, f"bf16+{backend}", [f117], 1)
        self.compile_blocks(model)
        self.section(f"bf16+{backend}+compile", self.config, model, f"bf16+{backend}+compile", [f117], 2)
        self.uncompile_blocks(model)
        mode = "fp8" if "fp8" in fp8.available_modes(self.device) else "fp8_weights"
        self.section("apply_fp8", self.quantise, model, mode)
        self.compile_blocks(model)
        self.section(f"{mode}+{backend}+compile", self.config, model, f"{mode}+{backend}+compile", [f117, f81],
                     self.args.reps)
        self.section("profile", self.profile, model, f"{mode}+{backend}+compile", f117)
        apply_attention(model, attention.sdpa_attention)
        self.section(f"{mode}+sdpa+compile", self.config, model, f"{mode}+sdpa+compile", [f117], 2)
        self.uncompile_blocks(model)
        self.results["total_s"] = time.perf_counter() - self.started
        self.save()
        summary(self.results)

    def quantise(self, model, mode):
        t0 = time.perf_counter()
        layers = fp8.apply_fp8(model, mode, self.device)
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()
        self.results.setdefault("apply_fp8", {})[mode] = {
            "layers": len(layers), "s": time.perf_counter() - t0,
            "param_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GiB,
            "allocated_gib": torch.cuda.memory_allocated() / GiB if self.cuda else None,
        }
        print(f"  apply_fp8 {mode}: {self.results['apply_fp8'][mode]}", flush=True)


def time_ms(fn, warmup: int, reps: int, cuda: bool) -> list[float]:
    """Milliseconds of each of `reps` calls after `warmup` untimed ones: CUDA events on a GPU, the wall
    clock on a CPU."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def profile_kernels(fn, cuda: bool, top: int = 40) -> dict:
    """One call of `fn` under torch.profiler: kernel time by category and the `top` kernels. On a GPU
    only GPU kernels count (CPU-side op rows would count their kernels' time again)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        if cuda:
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(evt, "self_device_time_total", None)
            t = getattr(evt, "self_cuda_time_total", 0) if t is None else t
        else:
            t = evt.self_cpu_time_total
        if t > 0:
            rows.append({"name": evt.key[:200], "self_ms": t / 1e3, "count": evt.count})
    rows.sort(key=lambda r: -r["self_ms"])
    cats: dict[str, float] = {}
    for r in rows:
        cats[categorise(r["name"])] = cats.get(categorise(r["name"]), 0.0) + r["self_ms"]
    return {"total_ms": sum(r["self_ms"] for r in rows),
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top": rows[:top]}


def host_status() -> dict:
    """Resident set now and its peak (GiB), from /proc/self/status."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024 / GiB
    except OSError:
        pass
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def categorise(name: str) -> str:
    # Order matters: Inductor names its kernels after the ops they fuse ("..._convolution_...",
    # "..._cudnn_attention_..."), cuDNN's attention is a "flash_fprop", and its convolutions carry "gemm".
    n = name.lower()
    if n.startswith("triton_") or "quant" in n:
        return "triton (fused by compile; quantiser)"
    if any(s in n for s in ("flash", "fmha", "sdpa", "attn", "attention", "efficient")):
        return "attention"
    if any(s in n for s in ("fprop", "dgrad", "wgrad", "nchwtonhwc", "nhwctonchw", "conv")):
        return "conv"
    if any(s in n for s in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "_mm", "sm90_", "wgmma", "scaled_mm")):
        return "gemm"
    if any(s in n for s in ("reduce", "norm", "softmax")):
        return "reductions/norms"
    if any(s in n for s in ("elementwise", "vectorized", "copy", "cat", "unrolled", "index", "fill")):
        return "elementwise/copies"
    return "other"


def summary(results):
    print("\n=== DiT forward (ms median, peak GiB) ===")
    for key, r in results.get("runs", {}).items():
        print(f"{key:28s} {r['ms_median']:10.1f} ms  peak {r['peak_gib'] or 0:6.1f} GiB  finite={r['finite']}")
    for key, q in results.get("quality", {}).items():
        print(f"quality {key:20s} velocity rel err {q['velocity_rel_err']:.4f}  max block {max(q['block_rel_err']):.4f}")
    if results["errors"]:
        print("errors:", {k: v.splitlines()[0] for k, v in results["errors"].items()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-size model and shapes (CPU is fine)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per configuration")
    parser.add_argument("--budget-s", type=float, default=520, help="skip sections that would start after this")
    parser.add_argument("--plan", choices=["full", "followup", "int8fp8"], default="full",
                        help="full: every section; followup: FP8_KEEP + fast accumulation, and compiled blocks; "
                             "int8fp8: the 8-bit attention backend in the forward")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args = parser.parse_args()
    bench = Bench(args)
    {"full": bench.main, "followup": bench.followup, "int8fp8": bench.int8fp8}[args.plan]()
