"""Wan VAE: official key layout, normalisation, causality, tiling and the streamed decode, on a tiny VAE
with random weights.

The tiny VAE has the real architecture (dim_mult [1, 2, 4, 4], 2 residual blocks, temporal downsampling
[False, True, True], z_dim 16 as the DiT needs) with base_dim 8 instead of 96.
"""

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from torch._dynamo.utils import counters

from pipeline.kernels.compile import compile_problem
from pipeline.models.vae_layout import apply_vae_layout
from pipeline.models.vae import (
    VAETiling,
    WanVAE,
    compile_vae,
    latent_frames,
    vae_config_from_shapes,
    vae_from_official,
    vae_state_dict_to_official,
)

TINY = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
}

# The per-channel latent statistics of the official WanVAE wrapper (Wan-Video/Wan2.1 wan/modules/vae.py).
OFFICIAL_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
OFFICIAL_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    """Seeded random weights of the tiny VAE, in the official key layout.

    Not diffusers' init: its defaults leave activations small, and these weights (variance-preserving
    convs, norm gains near 1) make the decoder overshoot [-1, 1] so the clamp is exercised.
    """
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in AutoencoderKLWan(**TINY).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith("gamma"):
            weights[name] = 1 + 0.1 * noise
        elif name.endswith("bias"):
            weights[name] = 0.1 * noise
        else:
            weights[name] = noise / shape[1:].numel() ** 0.5
    return vae_state_dict_to_official(weights)


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 9, 64, 64, generator=gen) * 2 - 1


def test_latent_statistics_are_the_official_ones():
    with torch.device("meta"):
        config = AutoencoderKLWan(**TINY).config
    assert config.latents_mean == OFFICIAL_MEAN
    assert config.latents_std == OFFICIAL_STD


def test_config_inferred_from_official_shapes(official):
    assert vae_config_from_shapes({name: tuple(t.shape) for name, t in official.items()}) == TINY


def test_official_layout_round_trip(official):
    config, converted = vae_from_official(official)
    assert config == TINY
    # Independent check of the naming: diffusers' own converter (written for this exact layout) agrees.
    assert converted.keys() == convert_wan_vae_to_diffusers(official).keys()
    with torch.device("meta"):
        assert converted.keys() == AutoencoderKLWan(**TINY).state_dict().keys()
    # Spot checks of official names, as in Wan2.1_VAE.pth.
    for name in (
        "conv1.weight",
        "encoder.downsamples.5.time_conv.weight",
        "decoder.upsamples.4.shortcut.weight",
        "decoder.upsamples.11.resample.1.weight",
        "decoder.middle.1.to_qkv.weight",
    ):
        assert name in official
    back = vae_state_dict_to_official(converted)
    assert back.keys() == official.keys()
    assert all(back[name] is official[name] for name in official)  # renamed only, tensors untouched


def test_unknown_and_missing_keys_are_named(official):
    with pytest.raises(KeyError, match=r"encoder\.middle\.1\.extra\.weight"):
        vae_from_official({**official, "encoder.middle.1.extra.weight": torch.zeros(1)})
    incomplete = {name: t for name, t in official.items() if name != "decoder.head.2.bias"}
    with pytest.raises(KeyError, match=r"decoder\.head\.2\.bias"):
        vae_from_official(incomplete)


@pytest.fixture(scope="module")
def vae(official) -> WanVAE:
    return WanVAE.from_official(official)


@pytest.fixture(scope="module")
def latents(vae, video) -> torch.Tensor:
    return vae.encode(video)


@pytest.fixture(scope="module")
def decoded(vae, latents) -> torch.Tensor:
    return vae.decode(latents)


def test_shapes_and_clamp(vae, video, latents, decoded):
    assert latents.shape == (1, 16, latent_frames(9), 8, 8) == (1, 16, 3, 8, 8)
    assert latents.dtype == torch.float32
    assert vae.encode(video[:, :, :1]).shape == (1, 16, 1, 8, 8)

    assert decoded.shape == video.shape and decoded.dtype == torch.float32
    assert decoded.abs().max() == 1.0  # the decoder overshoots with these weights: the clamp bites
    assert vae.decode(latents[:, :, :1]).shape == (1, 3, 1, 64, 64)

    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        vae.encode(video[:, :, :8])  # 8 frames would lose the last one to the causal chunking


def test_normalisation_matches_the_formula(vae, video, latents, decoded):
    """Against the raw AutoencoderKLWan (diffusers' own encode and decode, where WanVAE streams) with the
    per-channel formula applied here in float64."""
    mean = torch.tensor(OFFICIAL_MEAN, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(OFFICIAL_STD, dtype=torch.float64).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        mu = vae.module.encode(video).latent_dist.mean.double()
        raw_decoded = vae.module.decode((latents.double() * std + mean).float()).sample.clamp(-1, 1)

    # Two fp32 encoders' rounding (observed max 1.1e-6), then fp32 subtraction and division.
    torch.testing.assert_close(latents.double(), (mu - mean) / std, rtol=0, atol=5e-6)
    # The de-normalised input differs by <= 1 ulp between fp32 and float64-then-rounded; the random
    # decoder amplifies that, and two decoders' rounding (observed max 4.5e-6).
    torch.testing.assert_close(decoded, raw_decoded, rtol=0, atol=1e-5)


def test_a_video_prefix_encodes_to_the_latent_prefix(vae, video, latents):
    """Causality the window loop relies on: latents of frames [0, 1 + 4k) do not see later frames."""
    # The prefix runs the same ops on the same chunks, so the match is exact.
    torch.testing.assert_close(vae.encode(video[:, :, :1]), latents[:, :, :1], rtol=0, atol=0)
    torch.testing.assert_close(vae.encode(video[:, :, :5]), latents[:, :, :2], rtol=0, atol=0)


def test_tiled_decode(official, latents, decoded):
    # Tiles at least as large as the frame: diffusers does not tile at all, so the result is identical.
    # (diffusers' decode against the streamed one: the same numbers up to fp32 rounding)
    whole = WanVAE.from_official(official, tiling=VAETiling(64, 64, 48, 48))
    torch.testing.assert_close(whole.decode(latents), decoded, rtol=0, atol=1e-5)

    # 32-pixel tiles (4 latents) at stride 16: 16 blended tiles. Random weights spread every latent over
    # the whole tile, so the seams are far from invisible: observed relative L2 error 0.57 (max abs 2.0)
    # for these weights, 0.45 with 48-pixel tiles at stride 32. The bound only says that the tiles land
    # in the right places, not that tiling is accurate.
    tiled = WanVAE.from_official(official, tiling=VAETiling(32, 32, 16, 16))
    tiled_decoded = tiled.decode(latents)
    assert tiled_decoded.shape == decoded.shape and tiled_decoded.abs().max() <= 1.0
    relative = ((tiled_decoded - decoded).norm() / decoded.norm()).item()
    assert 0 < relative < 0.8


def test_bf16_module_keeps_fp32_normalisation(official, video, latents):
    vae16 = WanVAE.from_official(official, dtype=torch.bfloat16)
    latents16 = vae16.encode(video)  # fp32 video in, cast to the module's dtype inside
    assert latents16.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: observed relative L2 error 1e-2 against fp32.
    assert ((latents16 - latents).norm() / latents.norm()).item() < 0.05
    assert vae16.decode(latents16).dtype == torch.float32


# ------------------------------------------------------------------------------ streamed encode, decode


@pytest.fixture(scope="module")
def vae64(official) -> WanVAE:
    return WanVAE.from_official(official, dtype=torch.float64)


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_streamed_decode_is_diffusers_decode(vae64, frames):
    """The streamed decode (pipeline/models/vae_stream.py) against diffusers' AutoencoderKLWan.decode, an
    independent implementation of the official cache bookkeeping, in float64 on non-square frames.

    Not to float64 precision: diffusers' nearest upsampling rounds its input to fp32 and back (exact in
    fp32 and bf16, the dtypes it is written for), so the two differ by fp32 rounding (observed 2e-7)."""
    gen = torch.Generator().manual_seed(frames)
    z = torch.randn(1, 16, frames, 6, 10, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = vae64.module.decode(z).sample  # (clamped inside)
        got = vae64._decode_stream(z).clamp(-1, 1)
    assert got.shape == expected.shape == (1, 3, 1 + 4 * (frames - 1), 48, 80)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 5, 13])
def test_streamed_encode_is_diffusers_encode(vae64, frames):
    """The streamed encode against diffusers' AutoencoderKLWan.encode (its posterior mean), float64: both
    temporal downsamplers see a first chunk and later ones, 13 frames the cache of a cache."""
    gen = torch.Generator().manual_seed(frames)
    video = torch.rand(1, 3, frames, 48, 80, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        expected = vae64.module.encode(video).latent_dist.mean
        got = vae64._encode_stream(video)
    assert got.shape == expected.shape == (1, 16, latent_frames(frames), 6, 10)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.skipif(compile_problem("cpu") is not None, reason=f"torch.compile cannot run here: {compile_problem('cpu')}")
def test_compiled_streamed_vae(official, video, latents, decoded):
    """memory.compile: two graphs each for encode and decode (the first chunk, every later one) for any
    number of frames (a window's motion frames, a shorter last window)."""
    vae = WanVAE.from_official(official)
    compile_vae(vae)
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(video), latents, rtol=0, atol=1e-5)
        # frames-major, as the renderer hands over a window's last frames (a [T, 3, H, W] transposed)
        vae.encode(video[0, :, :5].transpose(0, 1).contiguous().transpose(0, 1)[None])
        torch.testing.assert_close(vae.decode(latents), decoded, rtol=0, atol=1e-5)
        vae.decode(latents[:, :, :2].clone())
    assert counters["stats"]["unique_graphs"] - before == 4
    with pytest.raises(ValueError, match="already replaced"):
        compile_vae(vae)


def test_vae_layout_is_exact(official):
    """apply_vae_layout (channels-last, the base width padded with zero channels) against the plain
    stream, float64: the same numbers up to summation order. The tiny VAE's base width 8 stands in for
    the real 96; 8 -> 12 pads the conv inputs and outputs, norms and caches of the outer levels."""
    plain = WanVAE.from_official(official, dtype=torch.float64)
    laid_out = WanVAE.from_official(official, dtype=torch.float64)
    apply_vae_layout(laid_out, {8: 12})
    assert laid_out.module.decoder.conv_out.in_channels == 12 and laid_out.module.encoder.conv_in.out_channels == 12
    assert laid_out.module.decoder.norm_out.gamma.shape[0] == 12
    assert laid_out.module.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    gen = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 9, 48, 80, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        latents = plain._encode_stream(video)
        torch.testing.assert_close(laid_out._encode_stream(video), latents, rtol=0, atol=1e-12)
        torch.testing.assert_close(laid_out._decode_stream(latents), plain._decode_stream(latents), rtol=0, atol=1e-12)


def test_vae_layout_pads_activations_only(official):
    """The tiny VAE's middle attention projects 32 channels to a 96-wide qkv: the default padding
    (96 -> 128, the real VAE's base width) must leave that projection alone, or the attention's views
    no longer fit (what every CUDA renderer of the tiny model hit)."""
    plain = WanVAE.from_official(official, dtype=torch.float64)
    laid_out = WanVAE.from_official(official, dtype=torch.float64)
    apply_vae_layout(laid_out)
    assert laid_out.module.decoder.mid_block.attentions[0].to_qkv.out_channels == 96
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        latents = plain._encode_stream(video)
        torch.testing.assert_close(laid_out._encode_stream(video), latents, rtol=0, atol=1e-12)
        torch.testing.assert_close(laid_out._decode_stream(latents), plain._decode_stream(latents), rtol=0, atol=1e-12)


@pytest.mark.skipif(compile_problem("cpu") is not None, reason=f"torch.compile cannot run here: {compile_problem('cpu')}")
def test_compiled_vae_layout(official, video, latents, decoded):
    """The renderers' order on a GPU: apply_vae_layout, then compile_vae; the same encode and decode."""
    vae = WanVAE.from_official(official)
    apply_vae_layout(vae, {8: 12})
    compile_vae(vae)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(video), latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(latents), decoded, rtol=0, atol=1e-5)


def test_vae_layout_refusals(official):
    with pytest.raises(ValueError, match="tiled VAE"):
        apply_vae_layout(WanVAE.from_official(official, tiling=VAETiling()))
    with pytest.raises(ValueError, match="attends over 32 channels"):  # the middle blocks' width
        apply_vae_layout(WanVAE.from_official(official), {32: 48})


def test_only_the_wan21_vae_streams(official):
    with torch.device("meta"):
        wan22 = AutoencoderKLWan(**TINY, is_residual=True)
    with pytest.raises(ValueError, match="only the Wan2.1 VAE"):
        WanVAE(wan22)
