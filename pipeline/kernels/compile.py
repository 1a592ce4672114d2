"""Regional torch.compile of the DiT: every block's forward compiled, one compiled graph shared by all;
and the checks every compiled piece makes (the VAE's own compile is pipeline/models/vae.py's compile_vae).

    compile_blocks(model, device, full_frames) -> CompiledBlocks   compile each block of `model.blocks` in place
    compile_problem(device)                                why torch.compile cannot run on `device`, or None
    raise_recompile_limit()                                let one process compile RECOMPILE_LIMIT shapes

Why the blocks: the 40 blocks are one class with one `forward`. Dynamo keeps compiled code per code
object and guards on the tensors' properties (shape, dtype, device, strides), not on which block it
is, so the first block compiles and the other 39 reuse its graph (tests/test_memory.py counts it);
compiling the whole model would trace 40 copies. What it buys, on the H100 at 117 frames
(benchmarks/RESULTS.md): 7.22 -> 5.47 s per bf16 forward and 6.64 -> 4.63 s in fp8, the fp32
elementwise work of dit.py (RoPE, adaLN modulation, norms, gated residuals, casts) fused, and the
block's fp32 temporaries no longer all alive at once.

Only `forward` is compiled: the block's hooks (block offload, sequence parallelism) stay eager, in
`nn.Module.__call__` around it, so streams, events and parameter swaps never enter a graph.

What compiles, and when. A job's windows all have one length except its last, which is shorter (any
4n+1 from motion + 4 up to the window: up to 23 lengths at 117/25), and a job shorter than one window
has one short window. So the blocks have two compiled functions:
  - at the full window's latent frame count (`full_frames`), static graphs (dynamic=False): one per
    input shape, i.e. per batch (guidance passes batched together), output size and speaker count (two
    speakers add the reference-map inputs; their silent-audio passes run as one speaker);
  - at any other frame count, one graph with dynamic shapes (dynamic=True), so that a job's shorter last
    window or a new job's short one compiles nothing new: the first such call compiles it (measured at
    14B in benchmarks/RESULTS.md), later lengths reuse it. It is a second code object (_any_length), so
    Dynamo's cache never hands a full window the dynamic graph.
Without `full_frames` every shape is static. Each new input shape is logged with its first call's time
(tracing, Inductor and that call's run). Also guarded, and so recompiled (not logged): a change of grad
mode (no_grad vs inference_mode), of the attention function (apply_attention after compile_blocks) or
of the fp8 layers' mode. Every shape is one cache entry of the code object; past dynamo's recompile
limit (8 by default) the blocks would quietly run eagerly, so both functions raise it to
RECOMPILE_LIMIT. Inductor's on-disk cache makes a later process's compile of a seen shape cheaper.

A device where torch.compile cannot run (no C++ compiler for the CPU backend, no working Triton for
CUDA) is a start-up error (KernelUnavailable), found by compiling and running a probe function there:
no silent fallback to eager blocks.
"""

import inspect
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch._dynamo
from torch._dynamo.utils import counters
import torch.nn as nn

from pipeline.kernels import KernelUnavailable

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 128  # distinct block input shapes one process may compile


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x * 2 + 1).sum(dim=-1)


@lru_cache(maxsize=None)
def _compile_problem(device: str) -> str | None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        compiled = torch.compile(_probe, dynamic=False, fullgraph=True)
        x = torch.linspace(-1, 1, 64, device=device).view(4, 16)
        got, want = compiled(x), _probe(x)
    except Exception as exc:  # any failure to build or run compiled code here is the answer
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"torch.compile failed on a probe function ({type(exc).__name__}: {first_line})"
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return "torch.compile's probe function gave a wrong result"
    return None


def compile_problem(device: torch.device | str) -> str | None:
    """Why torch.compile cannot run on `device`, or None if it can (checked once per device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return _compile_problem(str(device))


def check_compile(device: torch.device | str) -> None:
    problem = compile_problem(device)
    if problem is not None:
        raise KernelUnavailable(f"torch.compile (DiT blocks, VAE) cannot run on {device}: {problem}")


@dataclass
class CompiledBlocks:
    """What compile_blocks did: the blocks it compiled and every call that compiled a graph, keyed by its
    route (static or any length) and inputs, with its time (tracing, Inductor, and that call's own run)."""

    blocks: int
    shapes: dict[tuple, float] = field(default_factory=dict)


def _signature(value) -> object:
    """What dynamo specialises on, for the log: tensor shapes and dtypes, plain values as they are."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def _any_length(block: nn.Module, *args, **kwargs):
    """A block's own forward, as a function of its own: compiled with dynamic shapes for every window
    length but the full one (its cache entries are this code object's, apart from the static graphs')."""
    return type(block).forward(block, *args, **kwargs)


def compile_blocks(model: nn.Module, device: torch.device | str | None = None,
                   full_frames: int | None = None) -> CompiledBlocks:
    """torch.compile every block of `model.blocks` in place, one graph shared by all.

    `device` is where the blocks run (default: where the model's first parameter outside the blocks
    is; blocks offloaded to host memory still run there). `full_frames`: the latent frames of a full
    window, compiled static; every other frame count runs one dynamic graph (the module docstring);
    None: every shape static. KernelUnavailable if torch.compile cannot run on `device`. The dynamo
    recompile limit is raised to RECOMPILE_LIMIT (a process-wide setting)."""
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("the model has no blocks to compile")
    if any("forward" in vars(block) for block in blocks):
        raise ValueError("the blocks' forward is already replaced (compiled twice?)")
    if device is None:
        device = next(p.device for n, p in model.named_parameters() if not n.startswith("blocks."))
    check_compile(device)
    raise_recompile_limit()
    signature = inspect.signature(type(blocks[0]).forward)
    if full_frames is not None and "frames" not in signature.parameters:
        raise TypeError(f"{type(blocks[0]).__name__}.forward has no `frames` argument to tell full windows by")
    any_length = torch.compile(_any_length, dynamic=True)

    state = CompiledBlocks(len(blocks))
    for block in blocks:
        static = torch.compile(block.forward, dynamic=False)

        def forward(*args, _block=block, _static=static, **kwargs):
            dynamic = full_frames is not None and signature.bind(_block, *args, **kwargs).arguments["frames"] != full_frames
            graphs, started = counters["stats"]["unique_graphs"], time.perf_counter()
            out = any_length(_block, *args, **kwargs) if dynamic else _static(*args, **kwargs)
            if counters["stats"]["unique_graphs"] > graphs:  # this call compiled
                key = ("any length" if dynamic else "static", _signature(args), _signature(kwargs))
                state.shapes[key] = time.perf_counter() - started
                log.info("compiled DiT blocks in %.1f s for %s inputs %s (graph %d; one graph for all %d blocks)",
                         state.shapes[key], *key[:2], len(state.shapes), state.blocks)
            return out

        block.forward = forward  # an instance attribute: nn.Module.__call__ (and its hooks) stay eager
    log.info("compile_blocks: %d blocks of %s on %s, torch.compile: %s", len(blocks), type(blocks[0]).__name__, device,
             f"static at {full_frames} latent frames, dynamic at the others" if full_frames else "static")
    return state


def raise_recompile_limit() -> None:
    """Every shape is one cache entry of the compiled code object; past dynamo's recompile limit (8 by
    default) it would quietly run eagerly. Raised to RECOMPILE_LIMIT, a process-wide setting."""
    config = torch._dynamo.config
    # (named cache_size_limit and accumulated_cache_size_limit before torch 2.6)
    limit, total = ("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit") else (
        "cache_size_limit", "accumulated_cache_size_limit")
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    setattr(config, total, max(getattr(config, total), 2 * RECOMPILE_LIMIT))
