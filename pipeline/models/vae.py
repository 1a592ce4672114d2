"""Wan2.1 causal video VAE: diffusers' AutoencoderKLWan loaded from the official `Wan2.1_VAE.pth` layout.

The VAE maps video in [-1, 1] of shape [B, 3, T, H, W] (T = 1 + 4k) to latents [B, 16, 1 + k, H/8,
W/8]. It is causal in time: the first frame is encoded on its own and every later group of 4 frames sees
only itself and the frames before it, so a video prefix always yields the same latent prefix (the window
loop relies on this when it re-encodes motion frames).

Latents handed to the DiT are normalised per channel, z = (mu - mean) / std, with the 16 means and stds of
the official `WanVAE` wrapper; diffusers' AutoencoderKLWan config carries the same numbers as its default
`latents_mean` / `latents_std` (tests/test_vae.py pins that).

Checkpoint layout: the official file uses Wan's own module names (`encoder.downsamples.5.time_conv`,
`decoder.upsamples.4.shortcut`, ...). The key mapping below is written once, from diffusers names to
official names, and used in both directions. diffusers' `convert_wan_vae_to_diffusers` gives the same
names for the real layout, but it hardcodes the decoder's block indices for 2 residual blocks and passes
unknown keys through silently, so it cannot guard a loader.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from torch import Tensor

from pipeline.kernels.compile import check_compile, raise_recompile_limit
from pipeline.models.vae_stream import check_vae, decode_chunk, encode_chunk

log = logging.getLogger(__name__)

TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8


def latent_frames(frames: int) -> int:
    """Latent frames for `frames` video frames (1 + 4k frames -> 1 + k latents)."""
    return (frames - 1) // TEMPORAL_FACTOR + 1


# ---------------------------------------------------------------------------------------------------------
# Official checkpoint layout
# ---------------------------------------------------------------------------------------------------------

def vae_config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """AutoencoderKLWan keyword arguments for an official-layout checkpoint, read from its key shapes.

    The real Wan2.1 VAE gives base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4], num_res_blocks 2,
    temperal_downsample [False, True, True]; a tiny VAE of the same architecture gives its own numbers.
    Everything else keeps diffusers' defaults, which are Wan2.1's (no attention outside the middle blocks,
    the Wan2.1 latent statistics, no residual up/down sampling as in Wan2.2).
    """
    base_dim = shapes["encoder.conv1.weight"][0]
    z_dim = shapes["conv2.weight"][0]  # post-quant 1x1x1 conv, z_dim -> z_dim

    # encoder.downsamples is flat: each level holds num_res_blocks residual blocks, and every level but
    # the last ends in a Resample, whose time_conv exists only when it also halves time.
    level_dims: list[list[int]] = [[]]
    temporal_downsample: list[bool] = []
    index = 0
    while True:
        prefix = f"encoder.downsamples.{index}."
        if prefix + "residual.6.weight" in shapes:
            level_dims[-1].append(shapes[prefix + "residual.6.weight"][0])
        elif prefix + "resample.1.weight" in shapes:
            temporal_downsample.append(prefix + "time_conv.weight" in shapes)
            level_dims.append([])
        else:
            break
        index += 1

    num_res_blocks = len(level_dims[0])
    if num_res_blocks == 0 or any(len(dims) != num_res_blocks for dims in level_dims):
        raise ValueError(f"Wan VAE checkpoint: uneven encoder levels, residual output dims {level_dims}")
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": [dims[-1] // base_dim for dims in level_dims],
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal_downsample,
    }


# A residual block's members: diffusers attribute -> position in the official nn.Sequential.
_RESNET = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_RESNET_PARAM = rf"({'|'.join(_RESNET)})\.(weight|bias|gamma)"
_TOP_LEVEL = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}


def _official_name(name: str, num_res_blocks: int) -> str:
    """The official key for one AutoencoderKLWan key; KeyError if the key fits no known module."""
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias|gamma)", name):
        side, layer, leaf = m.groups()
        return f"{side}.{_TOP_LEVEL[layer]}.{leaf}"
    if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", name):
        layer, leaf = m.groups()
        return f"{'conv1' if layer == 'quant_conv' else 'conv2'}.{leaf}"
    # Middle: official [resnet, attention, resnet]; diffusers keeps the two kinds in separate lists.
    if m := re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.{_RESNET_PARAM}", name):
        side, j, layer, leaf = m.groups()
        return f"{side}.middle.{2 * int(j)}.{_RESNET[layer]}.{leaf}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.((?:norm|to_qkv|proj)\.\w+)", name):
        side, rest = m.groups()
        return f"{side}.middle.1.{rest}"
    # Encoder: diffusers keeps the official flat list, only renaming residual members.
    if m := re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.{_RESNET_PARAM}", name):
        i, layer, leaf = m.groups()
        return f"encoder.downsamples.{i}.{_RESNET[layer]}.{leaf}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.((?:resample\.1|time_conv)\.(?:weight|bias))", name):
        i, rest = m.groups()
        return f"encoder.downsamples.{i}.{rest}"
    # Decoder: diffusers groups the official flat list per level, (num_res_blocks + 1) residual blocks
    # followed by one upsampler (none after the last level).
    per_level = num_res_blocks + 2
    if m := re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RESNET_PARAM}", name):
        level, j, layer, leaf = m.groups()
        return f"decoder.upsamples.{int(level) * per_level + int(j)}.{_RESNET[layer]}.{leaf}"
    if m := re.fullmatch(
        r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.((?:resample\.1|time_conv)\.(?:weight|bias))", name
    ):
        level, rest = m.groups()
        return f"decoder.upsamples.{int(level) * per_level + num_res_blocks + 1}.{rest}"
    raise KeyError(f"no official Wan VAE name for diffusers key {name!r}")


def _official_to_diffusers_names(config: dict) -> dict[str, str]:
    """Every official key the architecture `config` has, mapped to its diffusers key."""
    with torch.device("meta"):  # names only: no memory, no init
        model = AutoencoderKLWan(**config)
    return {_official_name(name, config["num_res_blocks"]): name for name in model.state_dict()}


def vae_from_official(official: Mapping[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """(AutoencoderKLWan config, state dict renamed to its keys) for an official-layout state dict; the
    tensors are not copied. Every official key must be consumed and every key the architecture needs
    must be present: a KeyError names the unknown and the missing keys."""
    config = vae_config_from_shapes({name: tuple(t.shape) for name, t in official.items()})
    names = _official_to_diffusers_names(config)
    unknown = sorted(set(official) - set(names))
    missing = sorted(set(names) - set(official))
    if unknown or missing:
        raise KeyError(
            f"Wan VAE checkpoint does not match {config}: unknown keys {unknown}, missing keys {missing}"
        )
    return config, {names[name]: tensor for name, tensor in official.items()}


def vae_state_dict_to_official(diffusers_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `vae_from_official`'s renaming (used to write checkpoints in the official layout)."""
    # The decoder's first level holds num_res_blocks + 1 residual blocks.
    prefix = "decoder.up_blocks.0.resnets."
    num_res_blocks = len({name.split(".")[4] for name in diffusers_state_dict if name.startswith(prefix)}) - 1
    return {_official_name(name, num_res_blocks): t for name, t in diffusers_state_dict.items()}


# ---------------------------------------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAETiling:
    """Spatial tiling in pixels (defaults are diffusers'). Tiles overlap by size - stride and are blended.

    Tiling changes the result: a tiled decode of the 14B's VAE (random weights) differs from the untiled
    one by 9.9% with 256/192 tiles (benchmarks/RESULTS.md, "Memory presets"); the tiny random-weight VAE
    of tests/test_vae.py shows far more, so it is no exact substitute. It saves memory at the cost of
    time (same section): use it only where memory needs it, with large tiles.
    A frame no larger than one tile is not tiled at all. diffusers tiles encode as well as decode.
    """

    tile_height: int = 256
    tile_width: int = 256
    stride_height: int = 192
    stride_width: int = 192


class WanVAE:
    """Encode video to normalised latents and decode them back, as the official Wan2.1 `WanVAE` does.

    Device and dtype are the wrapped module's: inputs are moved to them, the per-channel normalisation
    runs in fp32, and outputs (latents and video) are fp32. Untiled, the video and the latents stream
    through `encode_chunk` and `decode_chunk` (pipeline/models/vae_stream.py; compile_vae below compiles
    them) as chunks in `memory_format` (apply_vae_layout, pipeline/models/vae_layout.py, makes it
    channels-last); tiled encodes and decodes are diffusers' own.
    """

    def __init__(self, module: AutoencoderKLWan, tiling: VAETiling | None = None) -> None:
        check_vae(module)
        self.module = module
        self.encode_chunk, self.decode_chunk = encode_chunk, decode_chunk
        self.memory_format = torch.contiguous_format  # of the streamed chunks (apply_vae_layout sets it)
        # The tiling switch lives on the diffusers module, so set it either way: the wrapper owns it.
        if tiling is None:
            module.disable_tiling()
        else:
            module.enable_tiling(
                tile_sample_min_height=tiling.tile_height,
                tile_sample_min_width=tiling.tile_width,
                tile_sample_stride_height=tiling.stride_height,
                tile_sample_stride_width=tiling.stride_width,
            )
        self.z_dim = module.config.z_dim
        self.latents_mean = torch.tensor(module.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(module.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def from_official(
        cls,
        state_dict: Mapping[str, Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tiling: VAETiling | None = None,
    ) -> WanVAE:
        """Build from an official-layout state dict (e.g. `Wan2.1_VAE.pth` loaded with weights_only=True).

        The module is built on the meta device and takes the tensors as they are moved, so host memory
        holds the weights once. The official code runs the VAE in fp32; Precision's default is bf16 (its
        reasons there).
        """
        config, converted = vae_from_official(state_dict)
        with torch.device("meta"):
            module = AutoencoderKLWan(**config)
        weights = {name: t.to(device, dtype) for name, t in converted.items()}
        module.load_state_dict(weights, strict=True, assign=True)
        return cls(module.eval().requires_grad_(False), tiling)

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8 -> fp32 [B, 16, 1 + k, H/8, W/8].

        Uses the posterior mean (no sampling), as the official encode does.
        """
        # The causal chunking (1, then groups of 4) would silently drop trailing frames otherwise.
        if (
            video.ndim != 5
            or video.shape[1] != 3
            or (video.shape[2] - 1) % TEMPORAL_FACTOR
            or video.shape[3] % SPATIAL_FACTOR
            or video.shape[4] % SPATIAL_FACTOR
        ):
            raise ValueError(f"VAE encode wants [B, 3, 1 + 4k, 8m, 8n] video, got {tuple(video.shape)}")
        video = video.to(self.device, self.dtype)
        if self.module.use_tiling:
            mu = self.module.encode(video).latent_dist.mean
        else:
            mu = self._encode_stream(video)
        mean, std = self.latents_mean.to(mu.device), self.latents_std.to(mu.device)
        return (mu.float() - mean) / std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, 16, F, h, w] -> fp32 video [B, 3, 1 + 4(F - 1), 8h, 8w] in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(
                f"VAE decode wants [B, {self.z_dim}, F, h, w] latents, got {tuple(latents.shape)}"
            )
        z = latents.to(self.device, torch.float32)
        z = z * self.latents_std.to(z.device) + self.latents_mean.to(z.device)
        z = z.to(self.dtype)
        if self.module.use_tiling:
            video = self.module.decode(z).sample.float()
        else:
            video = self._decode_stream(z).float()
        # The official decode clamps; diffusers does too, but the range is this method's contract.
        return video.clamp_(-1.0, 1.0)

    def _encode_stream(self, video: Tensor) -> Tensor:
        """Frame 0 alone, then 4 frames at a time, as the official encode; the posterior mean."""
        starts = [0, *range(1, video.shape[2], TEMPORAL_FACTOR)]
        ends = [*starts[1:], video.shape[2]]
        caches, parts = None, []
        for start, end in zip(starts, ends):
            chunk = _fresh(video[:, :, start:end], self.memory_format)
            part, caches = self.encode_chunk(self.module.encoder, chunk, caches)
            parts.append(part)
        conv = self.module.quant_conv  # 1x1x1 to the mean and log-variance, z_dim channels each
        return F.conv3d(torch.cat(parts, dim=2), conv.weight, conv.bias)[:, : self.z_dim]

    def _decode_stream(self, z: Tensor) -> Tensor:
        """One latent frame at a time, as the official decode (the memory of one frame's activations)."""
        conv = self.module.post_quant_conv  # 1x1x1: no temporal context
        x = F.conv3d(z, conv.weight, conv.bias)
        batch, _, frames, height, width = x.shape
        video = torch.empty(batch, 3, 1 + TEMPORAL_FACTOR * (frames - 1), SPATIAL_FACTOR * height,
                            SPATIAL_FACTOR * width, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        caches, start = None, 0
        for i in range(frames):
            chunk = _fresh(x[:, :, i : i + 1], self.memory_format)
            chunk, caches = self.decode_chunk(self.module.decoder, chunk, caches)
            video[:, :, start : start + chunk.shape[2]] = chunk
            start += chunk.shape[2]
        return video


def compile_vae(vae: WanVAE) -> None:
    """torch.compile the VAE's streamed encode and decode chunks (dynamic=False) on the VAE's device.

    Two graphs each per frame size: the first chunk and every later one (pipeline/models/vae_stream.py).
    Tiled encodes and decodes are diffusers' own and stay eager. KernelUnavailable if torch.compile
    cannot run there."""
    if vae.encode_chunk is not encode_chunk or vae.decode_chunk is not decode_chunk:
        raise ValueError("the VAE's chunk functions are already replaced (compiled twice?)")
    check_compile(vae.device)
    raise_recompile_limit()
    vae.encode_chunk = torch.compile(encode_chunk, dynamic=False)
    vae.decode_chunk = torch.compile(decode_chunk, dynamic=False)
    log.info("compile_vae: the streamed VAE encode and decode on %s, torch.compile(dynamic=False)", vae.device)


def _fresh(chunk: Tensor, memory_format: torch.memory_format) -> Tensor:
    """A chunk with the strides of a new tensor in `memory_format`: a slice's depend on the whole
    video's length (and .contiguous() keeps a 1-frame slice's), and compiled chunk functions guard on
    them."""
    return chunk.clone(memory_format=memory_format)
