"""The streamed VAE laid out for cuDNN's convolutions on the GPU: applied to a loaded WanVAE in place.

    apply_vae_layout(vae)     channels-last chunks and weights; 96-channel layers padded to 128

Two changes, both measured on the H100 (benchmarks/RESULTS.md, "The VAE laid out for cuDNN"):
  - channels_last_3d (NDHWC) for the streamed chunks and the conv weights. cuDNN computes in NDHWC,
    so NCDHW tensors cost a transpose in and out of every convolution.
  - The full-resolution layers of the Wan2.1 VAE have 96 channels, for which cuDNN picks a slow
    kernel (sm80, ~180-220 TFLOP/s, against 500-580 for the 192- and 384-channel layers). Padded with
    zero channels to 128 they run 39% faster despite 1.78x the arithmetic.

The padding is exact. A zero input channel adds nothing to a convolution. The padded output channels
have zero weights and bias, so they stay zero through the RMS norms (zeros add nothing to the norm; the
norms keep their scale sqrt(96) and get zero gains), the SiLUs (SiLU(0) = 0), the residual sums, the
nearest upsampling and the causal caches. The real channels see the same arithmetic, summed in another
order (tests/test_vae.py checks it in float64). The cost is memory: the full-resolution activations and
caches grow by a third.

Only for the streamed (untiled) VAE: diffusers' tiled code runs the module as it is.
"""

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanResample,
    WanRMS_norm,
)
from torch import nn

from pipeline.models.vae import WanVAE

PAD_CHANNELS = {96: 128}  # the Wan2.1 VAE's base width -> what cuDNN runs fast (H100)


def apply_vae_layout(vae: WanVAE, pad_channels: dict[int, int] = PAD_CHANNELS) -> None:
    """Pad `vae`'s layers of pad_channels' widths with zero channels, and stream it channels-last."""
    if vae.module.use_tiling:
        raise ValueError("apply_vae_layout: a tiled VAE runs diffusers' code, which needs the module as loaded")
    for old, new in pad_channels.items():
        _pad(vae.module, old, new)
    for p in vae.module.parameters():
        if p.dim() == 4:  # the resamplers' per-frame conv2ds, used as conv3ds with a time kernel of 1
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        elif p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    vae.memory_format = torch.channels_last_3d


def _pad(module: nn.Module, old: int, new: int) -> None:
    """Every conv input or output, norm gain and bias of width `old` padded with zeros to `new`.

    Widths are those of the activations between layers. The attention blocks' projections are not
    padded even where a width matches (the tiny VAE's 3 x 32-channel qkv is 96 wide): their outputs are
    the concatenated q, k, v, not an activation."""
    attention = [name for name, layer in module.named_modules() if isinstance(layer, WanAttentionBlock)]
    for name, layer in module.named_modules():
        if isinstance(layer, WanAttentionBlock) and layer.dim == old:
            raise ValueError(f"apply_vae_layout: {name} attends over {old} channels, which cannot be padded")
        if any(name.startswith(f"{block}.") for block in attention):
            continue
        if isinstance(layer, WanResample) and layer.mode == "upsample3d" and layer.time_conv.out_channels == old:
            # its output channels are two frames' halves: padding the end would shift the second half
            raise ValueError(f"apply_vae_layout: {name}.time_conv interleaves {old} channels, which cannot be padded")
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            grow_out, grow_in = new - old if layer.out_channels == old else 0, new - old if layer.in_channels == old else 0
            if grow_out or grow_in:
                weight = layer.weight.data
                layer.weight.data = F.pad(weight, (0, 0) * (weight.dim() - 2) + (0, grow_in, 0, grow_out))
                if layer.bias is not None:
                    layer.bias.data = F.pad(layer.bias.data, (0, grow_out))
                layer.out_channels += grow_out
                layer.in_channels += grow_in
        elif isinstance(layer, WanRMS_norm) and layer.gamma.shape[0] == old:
            layer.gamma.data = _pad_first(layer.gamma.data, new - old)
            if isinstance(layer.bias, torch.Tensor):
                layer.bias.data = _pad_first(layer.bias.data, new - old)


def _pad_first(t: torch.Tensor, grow: int) -> torch.Tensor:
    """t padded with zeros along its first dimension."""
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, grow))
