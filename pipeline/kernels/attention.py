"""Attention backends: the one place where the choice of attention kernel lives.

Every attention in the models calls a function with the signature

    attend(q, k, v) -> out        q [B, Lq, H, D], k and v [B, Lk, H, D], out [B, Lq, H, D]

(the "NHD" layout Wan uses), unmasked, scale 1/sqrt(D); q and k may be fp32 (after RoPE) and are cast
to v's dtype, as the official code does.

Backends (`get_attention(name)`; `apply_attention(model, name)` puts one on every module of a model):

  sdpa  PyTorch scaled_dot_product_attention. On CUDA it is pinned to one of SDPA's kernels
        (`SDPA_CUDA_KERNEL`, chosen by measurement on the H100 at the 14B's self-attention shape,
        benchmarks/RESULTS.md), so the kernel cannot change under us; if that kernel refuses a shape
        the call fails instead of quietly running a slower one. cuDNN and flash take fp16 and bf16
        only, so fp32 attention (model.precision.dit=fp32, as the tiny model has) is pinned to
        `SDPA_FP32_KERNEL`, the one CUDA kernel of SDPA's for it: a fixed split by dtype. On the CPU,
        plain SDPA.
  sage  SageAttention 1.0.6 (PyPI, Triton; INT8 Q.K^T, fp16 P.V) on CUDA. Its kernel does not mask a
        partial last key block (the missing keys count as logit-0 keys with value 0), which is
        harmless when the partial block is a sliver of the keys (self-attention: 48 of 46,800) and
        wrong for short contexts (measured against fp32: CLIP's 257 keys, 63 phantom keys, 12.9% error;
        audio's 32 keys, 32 phantom, 37.5%; self-attention 1.3%, its INT8 error). Key lengths whose
        partial block exceeds `SAGE_MAX_PHANTOM` of the keys therefore go through `sdpa`: a fixed,
        documented split by shape (the error was measured, see RESULTS.md), not a fallback.
  int8fp8  our Triton kernel (attention_int8fp8.py): INT8 Q.K^T with per-token scales and key
        smoothing, FP8 P.V with per-channel scales and V smoothing, fp32 accumulation across key
        blocks. Hopper only (compute capability 9.0: INT8/FP8 wgmma, TMA). Key sets shorter than
        `INT8FP8_MIN_KEYS` (the cross-attentions) go to `sdpa`, where cuDNN measured faster and exact:
        like sage's, a fixed split by shape.
  auto  the fastest backend available here, by the measured ranking `AUTO_RANKING`; logged.

A backend that cannot run here is a start-up error (`KernelUnavailable`) that names what was asked and
what is available. There is no silent fallback to another backend.
"""

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.kernels import KernelUnavailable

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# SDPA's CUDA kernels by name. `sdpa` pins SDPA_CUDA_KERNEL: on the lent H100 (torch 2.11) at B=1, H=40,
# L=46,800, D=128 bf16, cuDNN 77 ms (579 TFLOP/s), flash 128 ms, efficient 250 ms, all at 0.23% from
# an fp32 reference; cuDNN is also the fastest at the text, CLIP and audio shapes (benchmarks/RESULTS.md).
SDPA_CUDA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
SDPA_CUDA_KERNEL = "cudnn"
SDPA_FP32_KERNEL = "efficient"  # fp32 q, k, v: cuDNN and flash refuse them ("No available kernel")

# Fastest first, as measured on the H100 at the 14B's shapes (benchmarks/RESULTS.md): self-attention
# 77 ms (sdpa/cuDNN) vs 100 ms (sage); whole forward at 117 frames 7.2 s vs 8.3 s. int8fp8 is faster
# still (3.97 vs 4.53 s a compiled fp8 forward; 6.48 vs 6.61 s eager bf16) but not ranked: it trades
# accuracy for it (1.1% at the velocity, 5% on near-uniform attention), so it is asked for by name.
AUTO_RANKING = ("sdpa", "sage")

SAGE_BLOCK_N = 64  # sageattention 1.0.6's key block
SAGE_MAX_PHANTOM = 1 / 256  # largest accepted (unmasked partial-block keys) / (real keys)
SAGE_HEAD_DIMS = (64, 96, 128)


# ---------------------------------------------------------------------------------------------- sdpa


def sdpa_with(kernel: str | None) -> AttentionFn:
    """SDPA pinned on CUDA to one of its kernels ('cudnn', 'flash', 'efficient'); None: PyTorch's own
    choice. CPU tensors always take plain SDPA."""
    backend = None if kernel is None else SDPA_CUDA_KERNELS[kernel]
    fp32_backend = None if kernel is None else SDPA_CUDA_KERNELS[SDPA_FP32_KERNEL]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2), v.transpose(1, 2)
        if v.is_cuda and backend is not None:
            with sdpa_kernel(fp32_backend if v.dtype == torch.float32 else backend):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    attend.__name__ = f"sdpa_{kernel or 'default'}"
    attend.__qualname__ = attend.__name__
    return attend


sdpa_attention = sdpa_with(SDPA_CUDA_KERNEL)


# ---------------------------------------------------------------------------------------------- sage


def _import_sage() -> Callable:
    """sageattention's `sageattn` (1.0.6 keeps it in `sageattention.core`; later versions export it)."""
    try:
        from sageattention import sageattn
    except ImportError:
        from sageattention.core import sageattn
    return sageattn


def sage_phantom_keys(key_len: int) -> int:
    """Keys that sageattention 1.0.6 adds unmasked (logit 0, value 0) to fill its last key block."""
    return -key_len % SAGE_BLOCK_N


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention where it is exact up to its quantisation, `sdpa_attention` for short key lengths
    that its unmasked partial key block would distort (see the module docstring)."""
    key_len = k.shape[1]
    if sage_phantom_keys(key_len) > key_len * SAGE_MAX_PHANTOM:
        return sdpa_attention(q, k, v)
    if q.shape[-1] not in SAGE_HEAD_DIMS:
        raise KernelUnavailable(f"attention backend 'sage' supports head dims {SAGE_HEAD_DIMS}, got {q.shape[-1]}")
    # sageattn subtracts the key mean from k in place: always hand it a copy.
    q, k = q.to(v.dtype), k.to(v.dtype, copy=True)
    return _import_sage()(q, k, v, tensor_layout="NHD", is_causal=False)


# ---------------------------------------------------------------------------------------------- int8fp8

INT8FP8_CAPABILITY = (9, 0)  # Hopper: INT8 and FP8 wgmma, TMA; the only architecture it was built and measured on
# Shorter key sets (the DiT's cross-attention: 512 text, 257 CLIP, 32 audio keys) go to sdpa: there the
# H100 measured cuDNN faster (1.36 vs 1.68 ms at 512 keys, quantisation included) and 15x more exact
# (0.2% vs 3.6%). Self-attention has at least 8 latent frames x 1,560 tokens at 480p.
INT8FP8_MIN_KEYS = 4096


def int8fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The int8fp8 kernel for long key sets, `sdpa_attention` below INT8FP8_MIN_KEYS keys."""
    if k.shape[1] < INT8FP8_MIN_KEYS:
        return sdpa_attention(q, k, v)
    from pipeline.kernels.attention_int8fp8 import int8fp8_attention as attend
    return attend(q, k, v)


def _int8fp8_problem(device: torch.device) -> str | None:
    """Why 'int8fp8' cannot run on `device`, or None if it can."""
    wanted = ".".join(map(str, INT8FP8_CAPABILITY))
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a Hopper GPU (CUDA compute capability {wanted}) and the device is {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability != INT8FP8_CAPABILITY:
        return (f"it is built for Hopper (compute capability {wanted}); "
                f"{torch.cuda.get_device_name(device)} is {'.'.join(map(str, capability))}")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc})"
    return None


# ---------------------------------------------------------------------------------------------- choice


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sage_problem(device: torch.device) -> str | None:
    """Why 'sage' cannot run on `device`, or None if it can."""
    if device.type != "cuda":
        return f"it needs a CUDA GPU and the device is {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        _import_sage()
        import triton  # noqa: F401  (sageattention's kernels are Triton)
    except ImportError as exc:
        return f"the sageattention package (1.0.6, with Triton) is not importable ({exc})"
    return None


BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "sage": sage_attention, "int8fp8": int8fp8_attention}
PROBLEMS: dict[str, Callable[[torch.device], str | None]] = {
    "sdpa": lambda device: None, "sage": _sage_problem, "int8fp8": _int8fp8_problem,
}


def available_attention(device: torch.device | str | None = None) -> list[str]:
    device = _default_device() if device is None else torch.device(device)
    return [name for name in BACKENDS if PROBLEMS[name](device) is None]


def get_attention(name: str, device: torch.device | str | None = None) -> AttentionFn:
    """The backend `name` ('sdpa', 'sage' or 'auto') for `device` (default: CUDA if present), or
    KernelUnavailable naming what was asked and what is available."""
    device = _default_device() if device is None else torch.device(device)
    if name == "auto":
        choice = next(n for n in AUTO_RANKING if PROBLEMS[n](device) is None)
        log.info("attention 'auto' on %s: chose %r (ranking %s; available %s)",
                 device, choice, list(AUTO_RANKING), available_attention(device))
        return BACKENDS[choice]
    if name not in BACKENDS:
        raise KernelUnavailable(
            f"attention backend {name!r} is unknown; known: {sorted(BACKENDS) + ['auto']}; "
            f"available on {device}: {available_attention(device)}"
        )
    problem = PROBLEMS[name](device)
    if problem is not None:
        raise KernelUnavailable(
            f"attention backend {name!r} is not available on {device}: {problem}; "
            f"available: {available_attention(device)}"
        )
    return BACKENDS[name]


def check_head_dim(fn: AttentionFn, head_dim: int) -> None:
    """KernelUnavailable if the backend `fn` cannot take the model's head dim (the tiny model's 16, say),
    so that a run stops at start-up instead of at its first window."""
    if fn is int8fp8_attention:
        from pipeline.kernels.attention_int8fp8 import HEAD_DIMS
        if head_dim not in HEAD_DIMS:
            raise KernelUnavailable(f"attention backend 'int8fp8' supports head dims {HEAD_DIMS}, the model has {head_dim}")
    if fn is sage_attention and head_dim not in SAGE_HEAD_DIMS:
        raise KernelUnavailable(f"attention backend 'sage' supports head dims {SAGE_HEAD_DIMS}, the model has {head_dim}")


def describe(fn: AttentionFn) -> str:
    if fn is sdpa_attention:
        return f"sdpa (CUDA kernel pinned: {SDPA_CUDA_KERNEL}; fp32: {SDPA_FP32_KERNEL})"
    if fn is sage_attention:
        return (f"sage (sageattention; key lengths whose partial {SAGE_BLOCK_N}-key block exceeds "
                f"{SAGE_MAX_PHANTOM:.2%} of the keys use sdpa, CUDA kernel {SDPA_CUDA_KERNEL})")
    if fn is int8fp8_attention:
        return (f"int8fp8 (Triton: INT8 Q.K^T, FP8 P.V; key sets under {INT8FP8_MIN_KEYS} use sdpa, "
                f"CUDA kernel {SDPA_CUDA_KERNEL})")
    return getattr(fn, "__name__", repr(fn))


def apply_attention(model: nn.Module, backend: str | AttentionFn, device: torch.device | str | None = None) -> AttentionFn:
    """Set `.attend` on every module of `model` that has one; `backend` is a name for `get_attention`
    or an attention function. Returns the function and logs the choice."""
    if isinstance(backend, str):
        if device is None:
            device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        fn = get_attention(backend, device)
    else:
        fn = backend
    modules = [m for m in model.modules() if hasattr(m, "attend")]
    for module in modules:
        module.attend = fn
    log.info("attention: %s on %d modules", describe(fn), len(modules))
    return fn
