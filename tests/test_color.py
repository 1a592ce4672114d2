"""Colour matching against its references, on real photographs.

References:
- `mkl`, `hm`, `reinhard`: the color-matcher library, called the way ComfyUI's ColorMatch node
  (kijai/ComfyUI-KJNodes) calls it: once per frame on float32 RGB in [0, 1], blended by strength, clamped.
- `lab`: the official InfiniteTalk formula (match_and_blend_colors) computed in float64 with scikit-image.

The "video" is scikit-image's astronaut under different exposures and colour casts (one frame quantised to
8 bits so the source histogram has ties too), matched to the coffee photograph quantised to 8 bits like the
job's reference image (ties in the reference histogram), at a different size than the frames.
"""

import warnings

import numpy as np
import pytest
import torch
from color_matcher import ColorMatcher
from skimage import color as skcolor
from skimage import data, transform

from pipeline.color import METHODS, match_colors

# Largest difference from the reference allowed per method, in 8-bit levels (1/255 of the [0, 1] range).
TOLERANCE = {
    # color-matcher takes the channel means of the float32 frames in float32 (numpy keeps the dtype), which
    # moves its results by up to ~0.002 levels at this size; against float64 inputs we are within 1e-4.
    "mkl": 0.01,
    # Same algorithm, exact rank arithmetic: only float32 rounding of the interpolation (measured 1e-5).
    "hm": 0.001,
    # Our log10 / 10**x run in float32, color-matcher's in float64 (measured 4e-4).
    "reinhard": 0.005,
    # float32 Lab conversions against skimage's float64 ones (measured 2e-4).
    "lab": 0.005,
}
MATCHING = tuple(TOLERANCE)


def _photo(name: str, height: int, width: int) -> np.ndarray:
    """A photograph bundled with scikit-image, resized: float64 RGB [H, W, 3] in [0, 1]."""
    return transform.resize(getattr(data, name)(), (height, width), anti_aliasing=True)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """[..., H, W, 3] in [0, 1] -> float32 [..., 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.moveaxis(images, -1, -3) * 2 - 1).float().contiguous()


def _levels(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] in [-1, 1] -> float64 [..., H, W, 3] in 8-bit levels."""
    return np.moveaxis(((images.double() + 1) / 2).numpy(), -3, -1) * 255


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    astronaut = _photo("astronaut", 64, 64)
    return _to_tensor(
        np.stack(
            [
                astronaut,
                np.clip(astronaut**1.4 * [1.10, 0.95, 0.80], 0, 1),  # darker, warm
                np.clip(astronaut**0.7 * [0.85, 0.95, 1.15], 0, 1),  # brighter, cold
                0.5 * astronaut + 0.25,  # washed out
                np.round(np.clip(astronaut * [0.9, 1.1, 0.9], 0, 1) * 255) / 255,  # green, 8-bit
            ]
        )
    )


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return _to_tensor(np.round(_photo("coffee", 48, 80) * 255) / 255)


def _comfyui_color_match(
    frames: torch.Tensor, reference: torch.Tensor, method: str, strength: float
) -> np.ndarray:
    """ComfyUI's ColorMatch node on our [-1, 1] tensors, in 8-bit levels [T, H, W, 3]."""
    src = np.moveaxis(((frames + 1) / 2).numpy(), 1, -1)  # float32, as ComfyUI's IMAGE tensors
    ref = np.moveaxis(((reference + 1) / 2).numpy(), 0, -1)
    out = []
    for frame in src:
        # Copies: color-matcher's reinhard writes into its inputs.
        result = ColorMatcher().transfer(src=frame.copy(), ref=ref.copy(), method=method)
        out.append(frame + strength * (result - frame))
    return np.clip(np.stack(out), 0, 1) * 255


def _official_lab(frames: torch.Tensor, reference: torch.Tensor, strength: float) -> np.ndarray:
    """The official match_and_blend_colors formula in float64 with scikit-image, in 8-bit levels."""
    src = np.clip(np.moveaxis((frames.double().numpy() + 1) / 2, 1, -1), 0, 1)
    ref_lab = skcolor.rgb2lab(np.clip(np.moveaxis((reference.double().numpy() + 1) / 2, 0, -1), 0, 1))
    out = []
    for frame in src:
        lab = skcolor.rgb2lab(frame)
        corrected = lab.copy()
        for ch in range(3):
            mean_src, std_src = lab[..., ch].mean(), lab[..., ch].std()
            mean_ref, std_ref = ref_lab[..., ch].mean(), ref_lab[..., ch].std()
            if std_src == 0:
                corrected[..., ch] = mean_ref
            else:
                corrected[..., ch] = (lab[..., ch] - mean_src) * (std_ref / std_src) + mean_ref
        with warnings.catch_warnings():  # skimage warns when it clips negative Z, as the official run does
            warnings.simplefilter("ignore")
            rgb = np.clip(skcolor.lab2rgb(corrected), 0, 1)
        out.append((1 - strength) * frame + strength * rgb)
    return np.stack(out) * 255


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("method", MATCHING)
def test_matches_reference(frames, reference, method, strength):
    if method == "lab":
        expected = _official_lab(frames, reference, strength)
    else:
        expected = _comfyui_color_match(frames, reference, method, strength)
    error = np.abs(_levels(match_colors(frames, reference, method, strength)) - expected)
    assert error.max() < TOLERANCE[method], f"{method}: max {error.max():.2e}, mean {error.mean():.2e} levels"
    # The matching must actually do something here, or the comparison above proves nothing.
    assert np.abs(expected - _levels(frames)).mean() > 5


def test_extrapolating_strength_matches_comfyui(frames, reference):
    """ComfyUI allows strength up to 10: the blend extrapolates from the unclamped result, then clamps."""
    expected = _comfyui_color_match(frames, reference, "mkl", 1.8)
    error = np.abs(_levels(match_colors(frames, reference, "mkl", 1.8)) - expected)
    assert error.max() < TOLERANCE["mkl"] * 1.8


@pytest.mark.parametrize(
    "method, tolerance",
    [
        # Identity up to float32 rounding (hm maps each value to itself, then the trip through [0, 1]).
        ("mkl", 0.001),
        ("hm", 0.001),
        ("lab", 0.001),
        # color-matcher's RGB <-> LMS matrices are rounded to 4 decimals, so its round trip is not the
        # identity (it moves this image by up to 1.74 levels too).
        ("reinhard", 2.0),
    ],
)
def test_frame_equal_to_reference_is_unchanged(reference, method, tolerance):
    out = match_colors(reference[None], reference, method)
    assert np.abs(_levels(out) - _levels(reference[None])).max() <= tolerance


@pytest.mark.parametrize("method", METHODS)
def test_strength_zero_returns_input(frames, reference, method):
    assert match_colors(frames, reference, method, 0.0) is frames


def test_none_returns_input(frames, reference):
    assert match_colors(frames, reference, "none", 1.0) is frames


@pytest.mark.parametrize("method", MATCHING)
def test_batch_equals_per_frame(frames, reference, method):
    batch = match_colors(frames, reference, method, 0.8)
    single = torch.cat([match_colors(frame[None], reference, method, 0.8) for frame in frames])
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", MATCHING)
def test_output_stays_in_range(frames, reference, method):
    """Decoded frames overshoot [-1, 1] and ComfyUI's strength extrapolates: the result is still in range, and
    keeps the frames' dtype."""
    overshooting = (frames * 1.3).to(torch.bfloat16)
    out = match_colors(overshooting, reference, method, 2.0)
    assert out.dtype == torch.bfloat16 and out.shape == frames.shape
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("method", MATCHING)
def test_flat_frame_stays_finite(reference, method):
    """A solid-colour frame has no spread to rescale (color-matcher's reinhard returns NaN for it)."""
    out = match_colors(torch.full((1, 3, 32, 32), 0.3), reference, method)
    assert torch.isfinite(out).all()
    assert out.flatten(2).std(-1).max() == 0  # still one colour


def test_unknown_method_lists_known_ones(frames, reference):
    with pytest.raises(ValueError, match="mkl, hm, reinhard, lab, none"):
        match_colors(frames, reference, "hm-mkl-hm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", MATCHING)
def test_cuda_matches_cpu(frames, reference, method):
    out = match_colors(frames.cuda(), reference.cuda(), method)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), match_colors(frames, reference, method), atol=2e-5, rtol=0)
