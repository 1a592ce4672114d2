"""Colour matching of decoded video frames to the job's reference image.

Each window is colour-matched after VAE decoding, before its overlap is cut, so the correction also shapes
the motion frames carried into the next window and keeps colours from drifting window after window.

Methods (all per frame, each frame against the same reference; all frames at once on the tensors' device):

- `mkl`: Monge-Kantorovich linear transfer, as the `color-matcher` library does it (ComfyUI's default).
- `hm`: per-channel histogram matching, as `color-matcher` does it.
- `reinhard`: Reinhard et al.'s mean/std transfer in Ruderman's log-LMS lalphabeta space, as `color-matcher`
  does it.
- `lab`: the official InfiniteTalk correction (`match_and_blend_colors` in wan/utils/multitalk_utils.py):
  mean/std transfer in CIE Lab (skimage's sRGB D65 conversion); its CLI's --color_correction_strength
  defaults to 1.
- `none`: frames returned as they are.

How the references apply them, which this module reproduces:

- ComfyUI's ColorMatch node (kijai/ComfyUI-KJNodes) calls `ColorMatcher().transfer(src=frame, ref=reference,
  method=...)` once per frame on float32 RGB in [0, 1], blends as `frame + strength * (result - frame)`
  (strength 0..10, so values above 1 extrapolate) and clamps the batch to [0, 1] at the end; strength 0
  returns the frames untouched. The matcher's own result is not clamped before the blend.
- The official code clips source and reference to [0, 1], converts to Lab, transfers, converts back
  (skimage clips to [0, 1]), blends `(1 - strength) * frame + strength * corrected` and maps back to
  [-1, 1]; strength 0 returns the frames untouched.

Both blends are the same formula, so `strength` works the same way for every method here. The matching
runs on RGB in [0, 1] for all methods, inputs clamped to it first (decoded frames can overshoot [-1, 1]).
ComfyUI-WanVideoWrapper's InfiniteTalk sampler hands color-matcher the [-1, 1] decoded frames directly;
`mkl` and `hm` give the same result in either range (both commute with an affine map of the values), but
`reinhard` takes logarithms and would see negative values there.
"""

import torch
from torch import Tensor

# --- shared helpers -------------------------------------------------------------------------------


def _mix(matrix: Tensor, x: Tensor) -> Tensor:
    """`matrix @ x` for a 3x3 matrix (or a batch of them) and channel-first pixels x [..., 3, N].

    Written as three broadcast multiply-adds rather than a matmul: with TF32 matmuls enabled (a common
    global setting for inference) a matmul would round colour values to 10 mantissa bits.
    """
    return sum(matrix[..., :, k, None] * x[..., k, None, :] for k in range(3))


# A channel whose spread is below this (in the units of the space it is measured in: log-LMS, Lab) is
# flat up to float32 rounding. Real frames are orders of magnitude above it.
_FLAT_STD = 1e-4


def _mean_std_transfer(x: Tensor, ref: Tensor) -> Tensor:
    """Shift and scale every channel of x [..., C, N] to the mean and (population) std of ref [C, M].

    A flat channel has no spread to rescale: it becomes the reference mean, as in the official code
    (color-matcher's Reinhard would divide by zero and return NaN).
    """
    x_std, x_mean = torch.std_mean(x, dim=-1, keepdim=True, correction=0)
    ref_std, ref_mean = torch.std_mean(ref, dim=-1, keepdim=True, correction=0)
    gain = torch.where(x_std > _FLAT_STD, ref_std / x_std, 0.0)
    return (x - x_mean) * gain + ref_mean


# --- mkl ------------------------------------------------------------------------------------------

# color-matcher regularises the inverse square roots of the source covariance's eigenvalues with
# np.spacing(1), the float64 machine epsilon: 1 / (sqrt(lambda) + eps).
_EPS64 = torch.finfo(torch.float64).eps


def _covariance(centred: Tensor) -> Tensor:
    """Unbiased (N - 1) channel covariance, as np.cov, of centred pixels [..., 3, N] -> [..., 3, 3]."""
    n = centred.shape[-1]
    return torch.stack([(centred * centred[..., k, None, :]).sum(-1) for k in range(3)], dim=-1) / (n - 1)


def _mkl_transfer_matrix(cov_src: Tensor, cov_ref: Tensor) -> Tensor:
    """The MKL map T = S^-1/2 (S^1/2 R S^1/2)^1/2 S^-1/2, for source covariances S and the reference R.

    Float64 3x3 algebra as in color-matcher: eigendecompositions with negative eigenvalues zeroed and the
    epsilon above. eigh instead of its eig: the matrices are symmetric, and the order of the eigenpairs
    cancels out of T.
    """
    val_src, vec_src = torch.linalg.eigh(cov_src)
    sqrt_src = val_src.clamp_min(0).sqrt()
    inv_sqrt_src = 1.0 / (sqrt_src + _EPS64)

    # S^1/2 R S^1/2 expressed in the source eigenbasis, and its square root.
    inner = sqrt_src[..., :, None] * (vec_src.mT @ cov_ref @ vec_src) * sqrt_src[..., None, :]
    val_inner, vec_inner = torch.linalg.eigh(inner)
    sqrt_inner = vec_inner @ (val_inner.clamp_min(0).sqrt()[..., :, None] * vec_inner.mT)

    return vec_src @ (inv_sqrt_src[..., :, None] * sqrt_inner * inv_sqrt_src[..., None, :]) @ vec_src.mT


def _mkl(src: Tensor, ref: Tensor) -> Tensor:
    """Monge-Kantorovich linear transfer of src [T, 3, H, W] to ref [3, H', W'] (both RGB in [0, 1]).

    Every frame's pixel distribution, seen as a Gaussian, is moved onto the reference's by the linear map
    that displaces colours least: out = T (x - mean_src) + mean_ref.
    """
    x = src.flatten(2)
    z = ref.flatten(1)
    x_mean = x.mean(-1, keepdim=True)
    z_mean = z.mean(-1, keepdim=True)
    x_centred = x - x_mean
    transfer = _mkl_transfer_matrix(_covariance(x_centred).double(), _covariance(z - z_mean).double())
    return (_mix(transfer.float(), x_centred) + z_mean).view_as(src)


# --- hm -------------------------------------------------------------------------------------------


def _match_histogram(x: Tensor, ref: Tensor) -> Tensor:
    """Histogram matching of every row of x [T, N] to the reference values ref [M], as color-matcher does.

    color-matcher has no bins: it takes every distinct value v with its empirical CDF (the fraction of
    pixels <= v), and maps a source value through np.interp(cdf_src(v), cdf_ref, values_ref), i.e. the
    reference's inverse CDF, linear between its distinct values and clamped at both ends.

    Here the CDFs are integer ranks (searchsorted on the sorted values, `right=True` counting ties), so
    duplicated reference values (an 8-bit reference has at most 256 per channel) become repeated identical
    knots, which leave the piecewise-linear curve unchanged, and no np.unique is needed. The fractions
    rank_src / N and rank_ref / M are compared exactly, as the integers rank_src * M and rank_ref * N.
    """
    n = x.shape[-1]
    query = torch.searchsorted(x.sort(-1).values, x, right=True)  # pixels <= each value, per row

    ref_values = ref.sort().values  # the curve's y knots
    m = ref_values.shape[-1]
    knots = torch.searchsorted(ref_values, ref_values, right=True) * n  # its x knots, as fractions * N * M
    query = query * m

    above = torch.searchsorted(knots, query, right=True)  # first knot strictly above the query
    lo = (above - 1).clamp(0, m - 1)
    hi = above.clamp(0, m - 1)  # lo == hi below the first knot and at the last: np.interp's end values
    weight = torch.where(hi > lo, (query - knots[lo]) / (knots[hi] - knots[lo]).clamp_min(1), 0.0)
    return ref_values[lo] + weight * (ref_values[hi] - ref_values[lo])


def _hm(src: Tensor, ref: Tensor) -> Tensor:
    """Per-channel histogram matching of src [T, 3, H, W] to ref [3, H', W'], as color-matcher does it.

    One channel at a time (all frames at once): the int64 ranks of a whole window are large.
    """
    out = torch.empty_like(src)
    for channel in range(3):
        rows = src[:, channel].flatten(1).contiguous()  # searchsorted wants contiguous rows
        matched = _match_histogram(rows, ref[channel].flatten())
        out[:, channel] = matched.view_as(out[:, channel])
    return out


# --- reinhard -------------------------------------------------------------------------------------

# color-matcher's RGB <-> LMS matrices (Reinhard et al. 2001). The inverse is the paper's rounded one, not
# the exact inverse of the forward matrix; kept as is to match.
_LMS_FROM_RGB = torch.tensor(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]], dtype=torch.float64
)
_RGB_FROM_LMS = torch.tensor(
    [[4.4679, -3.5873, 0.1193], [-1.2186, 2.3809, -0.1624], [0.0497, -0.2439, 1.2045]], dtype=torch.float64
)
# Ruderman's decorrelating transform from log-LMS to lalphabeta: diag(1/sqrt 3, 1/sqrt 6, 1/sqrt 2) applied to
# [[1, 1, 1], [1, 1, -2], [1, -1, 0]]. Its rows are orthonormal, so its transpose (color-matcher's c.T @ b)
# is its exact inverse.
_LAB_FROM_LOG_LMS = torch.diag(torch.tensor([3.0, 6.0, 2.0], dtype=torch.float64).rsqrt()) @ torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]], dtype=torch.float64
)


def _rgb_to_lalphabeta(rgb: Tensor) -> Tensor:
    """RGB in [0, 1], channel-first pixels [..., 3, N] -> Ruderman's lalphabeta."""
    # color-matcher replaces exact zeros with one 8-bit level so the logarithm stays finite.
    rgb = torch.where(rgb == 0, 1.0 / 255.0, rgb)
    return _mix(_LAB_FROM_LOG_LMS.to(rgb), torch.log10(_mix(_LMS_FROM_RGB.to(rgb), rgb)))


def _reinhard(src: Tensor, ref: Tensor) -> Tensor:
    """Reinhard et al.'s colour transfer of src [T, 3, H, W] to ref [3, H', W'], as color-matcher does it:
    mean/std transfer of each lalphabeta channel, then back through log-LMS to RGB (not clipped)."""
    matched = _mean_std_transfer(_rgb_to_lalphabeta(src.flatten(2)), _rgb_to_lalphabeta(ref.flatten(1)))
    lms = torch.pow(10.0, _mix(_LAB_FROM_LOG_LMS.mT.to(matched), matched))
    return _mix(_RGB_FROM_LMS.to(lms), lms).view_as(src)


# --- lab (official) -------------------------------------------------------------------------------

# skimage.color's sRGB (D65) <-> CIE XYZ matrix and the D65 2-degree white point, which the official code
# uses through rgb2lab / lab2rgb with their defaults; skimage inverts the matrix in float64 too.
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def _rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1], channel-first pixels [..., 3, N] -> CIE Lab, as skimage.color.rgb2lab."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _mix(_XYZ_FROM_RGB.to(rgb), linear) / _D65_WHITE.to(rgb)[:, None]
    f = torch.where(xyz > 0.008856, xyz ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-2)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-2)


def _lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab, channel-first pixels [..., 3, N] -> sRGB clipped to [0, 1], as skimage.color.lab2rgb."""
    lightness, a, b = lab.unbind(-2)
    fy = (lightness + 16.0) / 116.0
    # skimage clips negative Z (before the inverse companding) to zero, with a warning.
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp_min(0)], dim=-2)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _D65_WHITE.to(lab)[:, None]
    linear = _mix(_RGB_FROM_XYZ.to(lab), xyz)
    # Out-of-gamut colours give negative linear values: the clamp keeps the discarded branch free of NaN.
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0) ** (1.0 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def _lab(src: Tensor, ref: Tensor) -> Tensor:
    """The official correction of src [T, 3, H, W] to ref [3, H', W']: per-frame mean/std transfer of the
    L, a and b channels to the reference's, converted back to RGB in [0, 1]."""
    matched = _mean_std_transfer(_rgb_to_lab(src.flatten(2)), _rgb_to_lab(ref.flatten(1)))
    return _lab_to_rgb(matched).view_as(src)


# --- dispatcher -----------------------------------------------------------------------------------

_MATCHERS = {"mkl": _mkl, "hm": _hm, "reinhard": _reinhard, "lab": _lab}
METHODS = (*_MATCHERS, "none")


def match_colors(frames: Tensor, reference: Tensor, method: str = "mkl", strength: float = 1.0) -> Tensor:
    """Colour-match every frame of `frames` [T, 3, H, W] to `reference` [3, H', W'], both in [-1, 1].

    `method` is one of METHODS (see the module docstring). `strength` blends the matched frames with the
    input, `frame + strength * (matched - frame)`, in [0, 1] RGB as both references do: 0 returns `frames`
    itself, 1 the fully matched frames, above 1 extrapolates (ComfyUI allows up to 10). The result is
    clamped to [-1, 1] and has the shape, dtype and device of `frames`; the work runs in float32 (float64
    for MKL's 3x3 matrix square roots) on that device, the reference moved there if it lives elsewhere.
    """
    if method not in METHODS:
        raise ValueError(f"unknown colour matching method {method!r}; known: {', '.join(METHODS)}")
    if frames.ndim != 4 or frames.shape[1] != 3 or reference.ndim != 3 or reference.shape[0] != 3:
        raise ValueError(
            f"expected frames [T, 3, H, W] and reference [3, H, W], got {tuple(frames.shape)} and "
            f"{tuple(reference.shape)}"
        )
    if method == "none" or strength == 0:
        return frames

    src = ((frames.float() + 1.0) / 2.0).clamp(0.0, 1.0).contiguous()
    ref = ((reference.to(frames.device, torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0).contiguous()
    matched = _MATCHERS[method](src, ref)
    blended = src + strength * (matched - src)
    return (blended.clamp(0.0, 1.0) * 2.0 - 1.0).to(frames.dtype)
