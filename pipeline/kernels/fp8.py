"""fp8 linear layers for the DiT blocks: e4m3 weights with one scale per output channel.

    apply_fp8(model, mode)      replace the blocks' nn.Linear layers in place, layer by layer
    Fp8Linear                   the replacement: `weight` float8_e4m3fn [out, in], `scale_weight` fp32
                                [out] (weight ~= weight_fp8 * scale_weight[:, None]), `bias` as before

Modes:
  fp8          y = x W^T through torch._scaled_mm: activations quantised to e4m3 per token (one scale
               per row, computed on the fly), weights per output channel, bf16 out; Hopper's fast
               accumulation (`FAST_ACCUM`, measured: same error, ~25% faster).
               Needs a CUDA GPU of compute capability 8.9 or newer; elsewhere a start-up error.
  fp8_weights  weights stored in fp8, de-quantised to the activation dtype for each matmul: halves the
               weights' memory on any device (the CPU included), no speed-up.

Which layers: `fp8_layer(name)`. Embeddings, the head, norms, the adaLN modulation and `audio_proj`
stay in their base dtype; inside the blocks, every nn.Linear except those `FP8_KEEP` names (chosen
by measured error, benchmarks/RESULTS.md).

The key names `weight` and `scale_weight` are ComfyUI's, so its pre-quantised fp8 files
(e4m3 `weight` + `scale_weight`, per tensor or per channel) load into these layers as they are
(`pipeline.models.checkpoints.load_dit(..., quant=...)`); `quantised_tensors` routes them.
"""

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.kernels import KernelUnavailable

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MODES = ("fp8", "fp8_weights")
SCALE = "scale_weight"  # ComfyUI's name for the weight scale

# nn.Linear layers inside the blocks, by their official names.
BLOCK_LINEAR = re.compile(
    r"^blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o|k_img|v_img)"
    r"|audio_cross_attn\.(q_linear|kv_linear|proj)|ffn\.(0|2))$"
)
# Block linears kept in the base dtype (suffixes after `blocks.N.`): the projections of the context
# (257 CLIP + 512 T5 tokens) and of the audio tokens (32 per frame). They run on <1,000 rows, so fp8
# gains them no time, yet on the 14B (H100, random weights) the four context projections alone gave
# 2.7% of block 0's 4.8% output error in fp8 (benchmarks/RESULTS.md). Cost: +4.2 GiB of weights.
FP8_KEEP: tuple[str, ...] = (
    "cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img", "audio_cross_attn.kv_linear",
)


def fp8_layer(name: str) -> bool:
    """Whether the module called `name` (a block nn.Linear not in FP8_KEEP) becomes fp8."""
    if not BLOCK_LINEAR.match(name):
        return False
    return name.split(".", 2)[2] not in FP8_KEEP


# ---------------------------------------------------------------------------------------------- numerics


def quantise_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (e4m3 [out, in], fp32 scale [out]) with scale = row absmax / 448 (rounded to
    nearest, ties to even; zero rows get the smallest scale and quantise to zero)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantise_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale.float()[:, None]).to(dtype)


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantisation: [M, K] -> (e4m3 [M, K], fp32 scale [M, 1])."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# On CUDA the activation quantiser is compiled (one fused Triton kernel instead of five eager passes:
# 0.80 ms instead of 3.19 ms for 46,800 x 5,120 on the H100). `COMPILE_QUANTISER = False` runs it eagerly.
COMPILE_QUANTISER = True
# _scaled_mm's fast accumulation: 1,330 instead of 1,030 TFLOP/s at 46,800 x 5,120 x 13,824 on the H100,
# with the same error against fp32 (3.75% vs 3.75%, dominated by the e4m3 rounding of both operands).
FAST_ACCUM = True
# Made at import (torch.compile compiles at the first call): set lazily, the first compiled DiT block to
# trace it would guard on it being unset and compile again once it is (seen at 14B: 9 s).
_compiled_quantise_rows = torch.compile(quantise_rows, dynamic=True, fullgraph=True)


def _quantiser():
    return _compiled_quantise_rows if COMPILE_QUANTISER else quantise_rows


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16) @ dequant(weight [N, K], scale [N])^T + bias through torch._scaled_mm with
    per-token activation scales. _scaled_mm's rules: the first operand row-major, the second
    column-major (weight.t() of a row-major [N, K] is), K and N multiples of 16, scales fp32 [M, 1] and
    [1, N], bf16 output."""
    shape = x.shape
    xq, x_scale = _quantiser()(x.reshape(-1, shape[-1]).contiguous())
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1),
        bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM,
    )
    return out.to(x.dtype).view(*shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------- layer


class Fp8Linear(nn.Module):
    """nn.Linear with an e4m3 weight and one fp32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "fp8_weights",
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if mode not in MODES:
            raise KernelUnavailable(f"quantisation mode {mode!r} is unknown; known: {list(MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.register_buffer(SCALE, torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str) -> "Fp8Linear":
        """Quantise `linear`'s weight into a new layer and free it from `linear` (the bias moves over)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, "meta", weight.dtype)
        if weight.device.type != "meta":
            q, scale = quantise_weight(weight.detach())
            layer.weight = nn.Parameter(q, requires_grad=False)
            layer.scale_weight = scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        linear.weight = None  # no second copy: the bf16 weight dies with this reference
        linear.bias = None
        return layer

    def dequantised_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantise_weight(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp8":
            return fp8_matmul(x, self.weight, self.scale_weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantised_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, mode={self.mode}"


# ---------------------------------------------------------------------------------------------- apply


def fp8_problem(mode: str, device: torch.device | str) -> str | None:
    """Why `mode` cannot run on `device`, or None if it can."""
    device = torch.device(device)
    if mode == "fp8_weights":
        return None
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"torch._scaled_mm needs a CUDA GPU of compute capability >= 8.9; the device is {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"torch._scaled_mm needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} "
                f"has {capability[0]}.{capability[1]}")
    return None


def available_modes(device: torch.device | str) -> list[str]:
    return [m for m in MODES if fp8_problem(m, device) is None]


def check_mode(mode: str, device: torch.device | str) -> None:
    if mode not in MODES:
        raise KernelUnavailable(f"quantisation mode {mode!r} is unknown; known: {list(MODES)}")
    problem = fp8_problem(mode, device)
    if problem is not None:
        raise KernelUnavailable(
            f"quantisation mode {mode!r} is not available on {device}: {problem}; available: {available_modes(device)}"
        )


def apply_fp8(
    model: nn.Module, mode: str, device: torch.device | str | None = None, select: Callable[[str], bool] = fp8_layer
) -> dict[str, Fp8Linear]:
    """Replace every nn.Linear whose name `select` accepts (default `fp8_layer`) with an Fp8Linear,
    one layer at a time (the bf16 weight is freed as its fp8 copy is made, so the model never holds
    both). A model on the meta device gets empty fp8 layers for a loader to fill; `device` is then
    where it will run. Layers that are fp8 already switch to `mode`. Returns the fp8 layers by name."""
    if device is None:
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    check_mode(mode, device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and select(n)]
    layers = {}
    for name in names:  # by name, so no list of the old modules keeps their weights alive
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        layer = Fp8Linear.from_linear(getattr(owner, leaf), mode)
        setattr(owner, leaf, layer)
        layers[name] = layer
    for name, layer in model.named_modules():  # already-fp8 layers (a second call) switch mode
        if isinstance(layer, Fp8Linear):
            layer.mode = mode
            layers[name] = layer
    log.info("fp8 (%s) on %s: %d linear layers; kept in %s: everything else (blocks' kept: %s)",
             mode, device, len(layers), next((p.dtype for p in model.parameters() if p.dtype != FP8), None),
             list(FP8_KEEP) or "none")
    return layers


# ---------------------------------------------------------------------------------------------- loading


def quantised_tensors(
    tensors: Iterable[tuple[str, torch.Tensor, Path]],
    layers: dict[str, Fp8Linear],
    device: torch.device | str,
) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Route a checkpoint's (name, tensor, file) stream into fp8 layers for `load_into`.

    For a layer in `layers`: an e4m3 weight passes through untouched (bit for bit) and its
    `scale_weight` (a scalar per tensor, or one per output channel) is expanded to [out]; any other
    weight (bf16/fp32 shards) is quantised on `device` and followed by its scale. Everything else
    passes through.
    """
    for name, tensor, source in tensors:
        layer_name, _, leaf = name.rpartition(".")
        layer = layers.get(layer_name)
        if layer is None or leaf not in ("weight", SCALE):
            yield name, tensor, source
        elif leaf == SCALE:
            scale = tensor.float().reshape(-1)
            if scale.numel() == 1:
                scale = scale.expand(layer.out_features).contiguous()
            elif scale.numel() != layer.out_features:
                yield name, tensor, source  # a shape load_into will report
                continue
            yield name, scale, source
        elif tensor.dtype == FP8:
            yield name, tensor, source
        else:
            q, scale = quantise_weight(tensor.to(device))
            yield name, q, source
            yield f"{layer_name}.{SCALE}", scale, source


def keeps_fp8(layers: dict[str, Fp8Linear]):
    """For `dit_tensors`: which stored fp8 weights to hand over as they are (the weights of `layers`)."""
    return lambda name: name.removesuffix(".weight") in layers


def fp8_dtype_of(base, layers: dict[str, Fp8Linear]):
    """`load_into`'s dtype rule with fp8 layers: e4m3 weights, fp32 scales, `base` for the rest."""

    def dtype_of(name: str) -> torch.dtype:
        layer_name, _, leaf = name.rpartition(".")
        if layer_name in layers and leaf == "weight":
            return FP8
        if layer_name in layers and leaf == SCALE:
            return torch.float32
        return base(name)

    return dtype_of
