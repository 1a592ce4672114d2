"""Regional torch.compile of the DiT: every block's forward compiled, one compiled graph shared by all;
and the checks every compiled piece makes (the VAE's own compile is pipeline/models/vae.py's compile_vae).

    compile_blocks(model, device=None) -> CompiledBlocks   compile each block of `model.blocks` in place
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

What recompiles (dynamic=False: every shape is static, so every new shape is a new graph):
  - a new input shape: batch (guidance passes batched together), tokens = latent frames x h x w (the
    window length and the output size) and the speaker count (two speakers add the reference-map
    inputs; their silent-audio passes run as one speaker: a second graph). A job's windows all have
    one length except its last, which is shorter (any 4n+1 from motion + 4 up to the window: up to 23
    lengths at 117/25), so a job whose last window has a length not seen yet compiles once more. Each
    compile serves all 40 blocks and is kept for the life of the process; each new input shape is
    logged with its first call's time (measured on the H100 at 117 frames: 11 s in bf16, 8 s in fp8,
    the forward included). Inductor's on-disk cache makes a later process's compile of a seen shape
    cheaper.
  - a change of grad mode (no_grad vs inference_mode), of the attention function (apply_attention
    after compile_blocks) or of the fp8 layers' mode: all are guarded (these are not logged).
Every shape is one cache entry of Block.forward's code object; past dynamo's recompile limit (8 by
default) the blocks would quietly run eagerly, so both functions raise it to RECOMPILE_LIMIT.

A device where torch.compile cannot run (no C++ compiler for the CPU backend, no working Triton for
CUDA) is a start-up error (KernelUnavailable), found by compiling and running a probe function there:
no silent fallback to eager blocks.
"""

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch._dynamo
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
    """What compile_blocks did: the blocks it compiled and every input shape compiled so far, with its
    compile time (the first call at a shape: tracing, Inductor, and that call's own run)."""

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


def compile_blocks(model: nn.Module, device: torch.device | str | None = None) -> CompiledBlocks:
    """torch.compile every block of `model.blocks` in place (dynamic=False), one graph shared by all.

    `device` is where the blocks run (default: where the model's first parameter outside the blocks
    is; blocks offloaded to host memory still run there). KernelUnavailable if torch.compile cannot run
    on it. The dynamo recompile limit is raised to RECOMPILE_LIMIT (a process-wide setting)."""
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("the model has no blocks to compile")
    if any("forward" in vars(block) for block in blocks):
        raise ValueError("the blocks' forward is already replaced (compiled twice?)")
    if device is None:
        device = next(p.device for n, p in model.named_parameters() if not n.startswith("blocks."))
    check_compile(device)
    raise_recompile_limit()

    state = CompiledBlocks(len(blocks))
    for block in blocks:
        compiled = torch.compile(block.forward, dynamic=False)

        def forward(*args, _compiled=compiled, **kwargs):
            key = (_signature(args), _signature(kwargs), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
            if key in state.shapes:
                return _compiled(*args, **kwargs)
            started = time.perf_counter()
            out = _compiled(*args, **kwargs)
            state.shapes[key] = time.perf_counter() - started
            log.info("compiled DiT blocks in %.1f s for new inputs %s (shape %d; one graph for all %d blocks)",
                     state.shapes[key], key[0], len(state.shapes), state.blocks)
            return out

        block.forward = forward  # an instance attribute: nn.Module.__call__ (and its hooks) stay eager
    log.info("compile_blocks: %d blocks of %s on %s, torch.compile(dynamic=False)", len(blocks),
             type(blocks[0]).__name__, device)
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
