"""The Wan2.1 VAE's encode and decode as streams of chunks through two pure chunk functions.

    caches = None
    for each latent frame i:   frames, caches = decode_chunk(module.decoder, latent[:, :, i:i+1], caches)
    for frame 0, then each 4:  latent, caches = encode_chunk(module.encoder, video[:, :, chunk], caches)

Same arithmetic as diffusers' AutoencoderKLWan.decode and encode (and the official Wan code they
mirror), written so that it is cheap and can be compiled:

  - Every causal conv keeps the last 2 frames of its input (zeros before the first chunk) and runs on
    [cache, chunk]. That is all the official cache bookkeeping amounts to (its 1-frame caches and zero
    padding give the same numbers): a causal conv over the whole frame stream with two leading zero
    frames. The temporal up- and downsamplers are the exceptions the official code makes: the first
    latent frame decodes to one frame, so the upsamplers' time conv skips the first chunk and starts on
    zeros in the second; the first frame encodes alone, so the downsamplers' strided time conv skips it
    too and then sees the last frame before each chunk.
  - Spatial zero padding is the conv's own (no F.pad copy; only the downsamplers' one-sided pad
    stays), the per-frame conv2ds are conv3ds with a temporal kernel of 1 on the 5-D tensor (no
    permutes), and the frames go into one preallocated video (no growing torch.cat): on an H100, two
    thirds of diffusers' 3.0 s window decode was such copies (benchmarks/RESULTS.md, "The VAE's 3.4 s
    of a window"; now 1.6 s compiled, "The streamed VAE"; 1.2 s laid out for cuDNN by
    pipeline/models/vae_layout.py, which the chunk functions follow: every tensor they make takes its
    input's memory layout).
  - The caches are plain tensors in and out, so `torch.compile` of a chunk function traces two static
    graphs, the first chunk and every later one, and fuses each RMS norm + SiLU into one pass
    (pipeline/models/vae.py: compile_vae).

Only the Wan2.1 VAE (diffusers' WanUpBlock and flat encoder, no patching); `check_vae` says so at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanDecoder3d,
    WanEncoder3d,
    WanResample,
    WanResidualBlock,
    WanUpBlock,
)
from torch import Tensor, nn

CACHE_FRAMES = 2  # a causal conv with a temporal kernel of 3 sees the 2 frames before the chunk


def check_vae(module: nn.Module) -> None:
    """ValueError unless `module` (an AutoencoderKLWan) is the Wan2.1 VAE this file implements."""
    if (
        not isinstance(module.decoder, WanDecoder3d)
        or not isinstance(module.encoder, WanEncoder3d)
        or module.config.patch_size is not None
        or not all(isinstance(block, WanUpBlock) for block in module.decoder.up_blocks)
        or not all(isinstance(block, (WanResidualBlock, WanResample)) for block in module.encoder.down_blocks)
    ):
        raise ValueError("streamed VAE: only the Wan2.1 VAE (no patching, no residual up/down blocks, "
                         "no attention outside the middle)")


def encode_chunk(encoder: WanEncoder3d, x: Tensor, caches: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
    """Encode video frames x [B, 3, T, H, W] that follow the frames whose caches are given (None: x
    starts the video: one frame; later chunks 4). Returns the encoder's output (before quant_conv) and
    the caches for the next chunk."""
    stream = _Stream(caches)
    x = stream.causal_conv(encoder.conv_in, x)
    for layer in encoder.down_blocks:
        x = _resnet(layer, x, stream) if isinstance(layer, WanResidualBlock) else _downsample(layer, x, stream)
    mid = encoder.mid_block
    x = _resnet(mid.resnets[0], x, stream)
    x = _attention(mid.attentions[0], x)
    x = _resnet(mid.resnets[1], x, stream)
    x = stream.causal_conv(encoder.conv_out, F.silu(_rms_norm(encoder.norm_out, x)))
    return x, stream.new


def decode_chunk(decoder: WanDecoder3d, x: Tensor, caches: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
    """Decode latent frames x [B, z, T, h, w] (after post_quant_conv) that follow the frames whose
    caches are given (None: x starts the video). Returns the video frames and the caches for the next
    chunk. The first chunk of one latent frame gives 1 frame, every later latent frame 4."""
    stream = _Stream(caches)
    x = stream.causal_conv(decoder.conv_in, x)
    mid = decoder.mid_block
    x = _resnet(mid.resnets[0], x, stream)
    x = _attention(mid.attentions[0], x)
    x = _resnet(mid.resnets[1], x, stream)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x, stream)
        if block.upsamplers is not None:
            x = _upsample(block.upsamplers[0], x, stream)
    x = stream.causal_conv(decoder.conv_out, F.silu(_rms_norm(decoder.norm_out, x)))
    return x, stream.new


class _Stream:
    """The caches of one chunk: read in call order from the previous chunk's, written for the next."""

    def __init__(self, caches: list[Tensor] | None):
        self.old, self.new = caches, []

    @property
    def first(self) -> bool:
        return self.old is None

    def causal_conv(self, conv: nn.Conv3d, x: Tensor) -> Tensor:
        """diffusers' WanCausalConv3d on x with the cached frames in front of it."""
        if conv._padding[4] != CACHE_FRAMES:
            raise ValueError(f"causal conv with temporal padding {conv._padding[4]}, expected {CACHE_FRAMES}")
        cache = _zero_frames(x, CACHE_FRAMES) if self.first else self.old[len(self.new)]
        x = torch.cat([cache, x], dim=2)
        # A copy, so that the cat's buffer need not outlive the chunk. The layout is explicit: compiled, a
        # plain clone of this slice (dense in channels-last) became a view of the 3x larger buffer.
        self.new.append(x[:, :, -CACHE_FRAMES:].clone(memory_format=memory_format(x)))
        return F.conv3d(x, conv.weight, conv.bias, stride=conv.stride, padding=(0, conv._padding[2], conv._padding[0]))

    def skip(self, x: Tensor) -> None:
        """A causal conv that does not run on the first chunk: its cache starts as zeros for the second."""
        self.new.append(_zero_frames(x, CACHE_FRAMES))

    def strided_time_conv(self, conv: nn.Conv3d, x: Tensor) -> Tensor:
        """diffusers' downsampling time conv (kernel 3, stride 2, no padding): the first chunk passes
        through; later ones run on [the frame before them, chunk]."""
        cache = None if self.first else self.old[len(self.new)]
        self.new.append(x[:, :, -1:].clone())
        if cache is None:
            return x
        return F.conv3d(torch.cat([cache, x], dim=2), conv.weight, conv.bias, stride=conv.stride)


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last_3d for a 5-D tensor laid out channels-last (what cuDNN computes in on Hopper),
    else contiguous_format."""
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _zero_frames(x: Tensor, frames: int) -> Tensor:
    """Zeros shaped as x with `frames` frames, in x's memory layout (a cat of mixed layouts copies)."""
    zeros = torch.empty(*x.shape[:2], frames, *x.shape[3:], dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return zeros.zero_()


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """diffusers' WanRMS_norm over the channels (dim 1), normalised in at least fp32 as it does."""
    gamma = norm.gamma.view(-1, *[1] * (x.ndim - 2))  # the attention's norm keeps a 2-D [C, 1, 1] gain
    bias = norm.bias.view(-1, *[1] * (x.ndim - 2)) if isinstance(norm.bias, Tensor) else norm.bias
    normalised = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1).to(x.dtype)
    return normalised * norm.scale * gamma + bias


def _resnet(block: nn.Module, x: Tensor, stream: _Stream) -> Tensor:
    if isinstance(block.conv_shortcut, nn.Identity):
        shortcut = x
    else:  # a 1x1x1 conv, no temporal context
        shortcut = F.conv3d(x, block.conv_shortcut.weight, block.conv_shortcut.bias)
    x = stream.causal_conv(block.conv1, F.silu(_rms_norm(block.norm1, x)))
    x = stream.causal_conv(block.conv2, F.silu(_rms_norm(block.norm2, x)))  # dropout: identity in eval
    return x + shortcut


def _attention(block: nn.Module, x: Tensor) -> Tensor:
    """One-head self-attention within each frame; its 1x1 conv2ds are linears over the channels."""
    b, c, t, h, w = x.shape
    y = _rms_norm(block.norm, x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
    q, k, v = F.linear(y, block.to_qkv.weight.view(3 * c, c), block.to_qkv.bias).chunk(3, dim=-1)
    y = F.scaled_dot_product_attention(q, k, v)
    y = F.linear(y, block.proj.weight.view(c, c), block.proj.bias)
    return x + y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


def _nearest_2x(x: Tensor) -> Tensor:
    """Nearest 2x upsampling in space (each pixel copied to a 2x2 block), in x's memory layout.

    The same numbers as diffusers' nearest-exact interpolate (its fp32 round trip around it changes
    nothing), written as one broadcast copy: compiled from a channels-last x, F.interpolate became a
    gather that wrote across layouts, 4.9 ms a chunk on the H100."""
    b, c, t, h, w = x.shape
    out = torch.empty(b, c, t, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    out.view(b, c, t, h, 2, w, 2).copy_(x[:, :, :, :, None, :, None])
    return out


def _downsample(resample: WanResample, x: Tensor, stream: _Stream) -> Tensor:
    """diffusers' WanResample down: a 3x3 stride-2 conv per frame after padding right and bottom by one,
    then (downsample3d) the strided time conv."""
    conv = resample.resample[1]
    x = F.conv3d(F.pad(x, (0, 1, 0, 1)), conv.weight.unsqueeze(2), conv.bias, stride=(1, *conv.stride))
    if resample.mode == "downsample3d":
        return stream.strided_time_conv(resample.time_conv, x)
    if resample.mode != "downsample2d":
        raise ValueError(f"encoder resample mode {resample.mode!r}")
    return x


def _upsample(resample: nn.Module, x: Tensor, stream: _Stream) -> Tensor:
    """diffusers' WanResample up: (in time: a causal conv to 2C channels, each frame becoming two) then
    nearest 2x in space and a 3x3 conv per frame."""
    if resample.mode == "upsample3d":
        if stream.first:
            stream.skip(x)
        else:
            x = stream.causal_conv(resample.time_conv, x)
            b, c2, t, h, w = x.shape
            # channels [0, C) are frame 2t, [C, 2C) frame 2t + 1
            layout = memory_format(x)
            x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
            x = x.contiguous(memory_format=layout)
    elif resample.mode != "upsample2d":
        raise ValueError(f"decoder resample mode {resample.mode!r}")
    x = _nearest_2x(x)
    conv = resample.resample[1]
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, padding=(0, 1, 1))
