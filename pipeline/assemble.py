"""A renderer assembled: the DiT and the VAE loaded, then made fast or small in one fixed order.

    build_renderer(paths, spec, device, group=None) -> Models(dit=..., vae=...)

Each step is an existing apply_* (or load) function; this file only decides which run and in what order
(the shape of torchtitan's parallelize_* functions). The order, and why:

  1. Checks: block offload, torch.compile and the quantisation mode on `device`. A kernel that cannot
     run here is a KernelUnavailable now, not after minutes of loading.
  2. Load (pipeline.models.checkpoints). Without offload the DiT goes to `device`, its block linears
     quantised as `spec.quant` says while they stream in. With offload it is loaded into host memory (it
     need not fit on the GPU); quant=fp8 then loads as fp8_weights (fp8 GEMMs need the GPU only to
     run) and the layers switch to fp8 after. The VAE goes to `device`, tiled as `spec.memory` says.
  3. Offload: the blocks kept in page-locked host memory and streamed to `device`.
  4. Attention backend on every attention module of the DiT.
  5. The VAE's cuDNN layout (pipeline/models/vae_layout.py), on CUDA and untiled only; before compiling,
     since the compiled graphs do not guard on the weights' layout.
  6. Compile: the DiT's blocks (static at the full window, one dynamic graph for shorter windows) and
     the VAE's streamed encode and decode; after the attention backend, which the compiled graph holds.
  7. Sequence parallelism over `group`, last: its hooks wrap the blocks as they will run.
"""

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.kernels import fp8
from pipeline.kernels.attention import apply_attention, check_head_dim
from pipeline.kernels.compile import check_compile, compile_blocks
from pipeline.kernels.offload import check_offload, offload_blocks
from pipeline.models.checkpoints import CheckpointPaths, Models, Precision, load_models
from pipeline.models.vae import VAETiling, WanVAE, compile_vae, latent_frames
from pipeline.models.vae_layout import apply_vae_layout
from pipeline.parallel import apply_sequence_parallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemorySettings:
    """What trades speed for memory (conf/memory/ as the farm's presets set it); the defaults are no measures."""

    compile: bool = False  # compile_blocks on the DiT and compile_vae on an untiled VAE
    offload: bool = False  # offload_blocks on the DiT ...
    offload_ahead: int = 2  # ... with this many blocks in flight ahead
    vae_tiling: VAETiling | None = None  # the VAE tiled (diffusers' code, eager); None: streamed, exact
    encoder_device: str | None = None  # where T5, CLIP and wav2vec2 run; None: the renderer's device


@dataclass(frozen=True)
class ModelSpec:
    """How to build a renderer's models, beyond where their files are and which device they run on."""

    precision: Precision = Precision()
    attention: str = "sdpa"  # a backend of pipeline.kernels.attention, or "auto"
    quant: str | None = None  # a mode of pipeline.kernels.fp8 for the DiT's block linears; None: none
    memory: MemorySettings = MemorySettings()
    window: int = 117  # frames of a full window: compiled for exactly; shorter ones share one dynamic graph


def build_renderer(
    paths: CheckpointPaths, spec: ModelSpec, device: torch.device | str, group: dist.ProcessGroup | None = None
) -> Models:
    """The DiT and the VAE of `paths` on `device`, prepared as `spec` says, in the order of this module's
    docstring; with `group`, the DiT splits every forward over its ranks (each rank calls this)."""
    memory, quant = spec.memory, spec.quant
    if memory.offload:
        check_offload(device)
    if memory.compile:
        check_compile(device)
    if quant is not None:
        fp8.check_mode(quant, device)

    if memory.offload:
        dit = load_models(paths, spec.precision, "cpu", ["dit"], dit_quant=quant and "fp8_weights").dit
        if quant == "fp8":
            fp8.apply_fp8(dit, quant, device)
        offload_blocks(dit, device, memory.offload_ahead)
    else:
        dit = load_models(paths, spec.precision, device, ["dit"], dit_quant=quant).dit
    vae = load_models(paths, spec.precision, device, ["vae"], vae_tiling=memory.vae_tiling).vae

    check_head_dim(apply_attention(dit, spec.attention, device), dit.cfg.dim // dit.cfg.num_heads)
    prepare_vae(vae, memory)
    if memory.compile:
        compile_blocks(dit, device, latent_frames(spec.window))
    if group is not None:
        apply_sequence_parallel(dit, group)
    log.info("renderer on %s: %s", device, spec)
    return Models(dit=dit, vae=vae)


def prepare_vae(vae: WanVAE, memory: MemorySettings) -> None:
    """Steps 5 and 6 for the VAE: the cuDNN layout where it applies, then compile if asked."""
    if vae.device.type == "cuda" and not vae.module.use_tiling:
        apply_vae_layout(vae)
    if memory.compile:
        compile_vae(vae)
