"""The int8fp8 attention kernel (pipeline/kernels/attention_int8fp8.py) on the CPU, through Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py; it runs the kernel's own code with numpy).
Checked against float64 attention, and against a float64 re-computation of the same quantised inputs, so that what is left is the kernel's own arithmetic (P in e4m3). Speed and the
error at the 14B's shapes on the H100 are in benchmarks/RESULTS.md.

The interpreter rounds fp32 -> e4m3 wrongly when the mantissa carries into the exponent (Triton 3.6-3.9:
0.4956 becomes 0.25, not 0.5), so P's rounding here is worse than on a GPU; the bounds allow for it."""

import math

import pytest
import torch
from torch._dynamo.utils import counters

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and tuple(map(int, triton.__version__.split(".")[:3])) < (3, 7, 1):
    pytest.skip("Triton's interpreter before 3.7.1 fails on NumPy 2.4", allow_module_level=True)

from pipeline.kernels import attention  # noqa: E402
from pipeline.kernels import attention_int8fp8 as kernel  # noqa: E402
from pipeline.kernels.attention import apply_attention, sdpa_attention  # noqa: E402
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT  # noqa: E402
from test_kernels import reference_attention as exact_attention  # noqa: E402
from test_kernels import rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dequantised_attention(q, k, v):
    """Attention in float64 of what quantise_inputs hands the kernel, dequantised: the error the
    8-bit inputs make, before the kernel's own (P in e4m3, the online softmax)."""
    q8, q_scale, k8, k_scale, v8, v_scale, v_mean = kernel.quantise_inputs(q, k, v)
    key_len, head_dim = k.shape[1], q.shape[-1]
    # q_scale carries 1/sqrt(D) * log2(e): take it out again
    qd = q8.double() * q_scale.double()[..., None] * math.sqrt(head_dim) / kernel.LOG2E
    k_step = k_scale.double().repeat_interleave(kernel.BLOCK_N, dim=2)[..., None]  # one scale per key block
    kd = (k8.double() * k_step)[:, :, :key_len]  # [B, H, Lk, D]
    vd = (v8.double() * v_scale.double()[..., None])[..., :key_len]  # [B, H, D, Lk]
    logits = torch.einsum("blhd,bhmd->bhlm", qd, kd) / math.sqrt(head_dim)
    return torch.einsum("bhlm,bhdm->blhd", logits.softmax(dim=-1), vd) + v_mean.double()[:, None]


def inputs(b, lq, lk, h, d, spread, seed):
    """q, k in fp32 (as after RoPE), v in bf16; keys and values with per-channel offsets, as real ones have."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=gen) * spread
    k = torch.randn(b, lk, h, d, generator=gen) * spread + 3 * torch.randn(1, 1, h, d, generator=gen)
    v = torch.randn(b, lk, h, d, generator=gen) + 2 * torch.randn(1, 1, h, d, generator=gen)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE, torch.bfloat16)


SHAPES = [  # B, Lq, Lk, H, D, logit spread
    (1, 200, 300, 2, 64, 2.0),  # several key blocks and a partial one; Lq not a multiple of BLOCK_M
    (2, 130, 33, 3, 64, 2.0),  # fewer keys than one block: the partial block alone, 95 padding keys masked
    (1, 64, 256, 1, 128, 1.0),  # whole blocks only
    (1, 100, 1000, 1, 32, 0.3),  # near-uniform attention over many keys
]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_against_float64(shape):
    *dims, spread = shape
    q, k, v = inputs(*dims, spread, seed=sum(dims))
    out = kernel.int8fp8_attention(q, k, v)
    b, lq, lk, h, d = dims
    assert out.shape == (b, lq, h, d) and out.dtype == torch.bfloat16
    exact = exact_attention(q, k, v.float()).cpu()
    dequantised = dequantised_attention(q, k, v).cpu()
    # the inputs' 8 bits (INT8 q, k; e4m3 v) alone: under 1%
    assert rel(dequantised, exact) < 0.01
    # the kernel against the same dequantised inputs: P in e4m3 (and the interpreter's rounding), bf16 out
    assert rel(out.cpu(), dequantised) < 0.01
    assert rel(out.cpu(), exact) < 0.015


def test_quantised_inputs_are_within_half_a_step():
    q, k, v = inputs(2, 50, 70, 3, 64, 1.0, seed=3)
    q[0, 5, 1] = 0  # an all-zero query row keeps its zeros
    q8, q_scale, k8, k_scale, v8, v_scale, v_mean = kernel.quantise_inputs(q, k, v)
    block = kernel.BLOCK_N
    padded = math.ceil(70 / block) * block
    assert q8.shape == (2, 50, 3, 64) and q8.dtype == torch.int8 and q_scale.shape == (2, 50, 3)
    assert k8.shape == (2, 3, padded, 64) and k8.dtype == torch.int8 and k_scale.shape == (2, 3, padded // block)
    assert v8.shape == (2, 3, 64, padded) and v8.dtype == torch.float8_e4m3fn
    assert v_scale.shape == v_mean.shape == (2, 3, 64)
    assert q8[0, 5, 1].eq(0).all()

    q_step = q_scale.double()[..., None] * math.sqrt(64) / kernel.LOG2E  # one int8 step of q
    assert ((q8.double() * q_step - q.double()).abs() <= q_step / 2 * (1 + 1e-6)).all()
    assert q8.abs().amax(dim=-1)[q_scale > 1e-30].eq(127).all()  # every nonzero row uses the full range

    smoothed = (k - k.mean(dim=1, keepdim=True)).double().transpose(1, 2)
    k_step = k_scale.double().repeat_interleave(block, dim=2)[..., None]  # one scale per block of keys
    assert ((k8.double() * k_step)[:, :, :70] - smoothed).abs().le(k_step[:, :, :70] / 2 * (1 + 1e-6)).all()
    assert k8.view(2, 3, -1, block * 64).abs().amax(dim=-1).eq(127).all()  # every block uses the full range
    assert k8[:, :, 70:].eq(0).all()

    centred = (v.double() - v.double().mean(dim=1, keepdim=True)).permute(0, 2, 3, 1)
    dequantised = v8.double()[..., :70] * v_scale.double()[..., None]
    # e4m3 keeps 3 mantissa bits: within 1/16 relative, or half the subnormal step 2^-9 of the scale
    floor = 2.0**-10 * v_scale.double()[..., None].max()
    assert ((dequantised - centred).abs() <= (centred.abs() / 16).clamp_min(floor)).all()
    assert v8[..., 70:].float().eq(0).all()


def test_compiled_quantisation_gives_the_same_attention():
    """Inside torch.compile the quantisation is fused and the kernel stays an opaque custom op."""
    q, k, v = inputs(1, 100, 300, 2, 64, 1.0, seed=5)
    compiled = torch.compile(kernel.int8fp8_attention, dynamic=False, fullgraph=True)
    assert rel(compiled(q, k, v).cpu(), kernel.int8fp8_attention(q, k, v).cpu()) < 2e-3


def test_one_dynamic_graph_serves_every_sequence_length():
    """The DiT's shorter windows run the blocks compiled with dynamic shapes (pipeline/kernels/compile.py):
    the kernel's inputs are then symbolic lengths, keys padded to whole blocks by a symbolic amount."""
    compiled = torch.compile(kernel.int8fp8_attention, dynamic=True, fullgraph=True)
    before = counters["stats"]["unique_graphs"]
    for length in (200, 384, 457):  # a partial key block, whole blocks, a partial one again
        q, k, v = inputs(1, length, length, 2, 64, 1.0, seed=length)
        assert rel(compiled(q, k, v).cpu(), kernel.int8fp8_attention(q, k, v).cpu()) < 2e-3, length
    assert counters["stats"]["unique_graphs"] - before == 1


def test_head_dims_the_kernel_cannot_take_are_refused():
    q, k, v = inputs(1, 16, 16, 1, 48, 1.0, seed=1)
    with pytest.raises(ValueError, match="head dims 32, 64, 128, 256, not 48"):
        kernel.int8fp8_attention(q, k, v)


def test_backend_sends_short_key_sets_to_sdpa():
    """The `int8fp8` backend's split by shape: fewer than INT8FP8_MIN_KEYS keys is sdpa, exactly."""
    q, k, v = inputs(2, 40, 512, 2, 64, 1.0, seed=2)
    assert 512 < attention.INT8FP8_MIN_KEYS
    assert torch.equal(attention.int8fp8_attention(q, k, v), sdpa_attention(q, k, v))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a Hopper GPU")
def test_backend_off_hopper_is_a_startup_error():
    with pytest.raises(attention.KernelUnavailable, match=r"'int8fp8' is not available on cpu: it needs a Hopper GPU"):
        attention.get_attention("int8fp8", "cpu")


def test_dit_forward_with_the_kernel_stays_close_to_sdpa():
    """The kernel on every attention of a small DiT (its self-attention, and the cross-attentions the
    backend would send to sdpa) against sdpa."""
    cfg = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=24, clip_dim=20, text_len=16,
                    freq_dim=32, audio_dim=16, audio_layers=3, audio_hidden=32, audio_tokens=4)
    torch.manual_seed(0)
    model = WanInfiniteTalkDiT(cfg).eval().to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    frames, h, w = 9, 8, 8
    f = (frames - 1) // 4 + 1
    args = dict(
        x=torch.randn(1, 16, f, h, w, generator=gen), t=torch.tensor([500.0]),
        text=torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen),
        clip_tokens=torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=gen),
        y=torch.randn(1, 20, f, h, w, generator=gen),
        audio=torch.randn(1, 1, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=gen),
    )
    args = {name: value.to(DEVICE) for name, value in args.items()}
    with torch.no_grad():
        apply_attention(model, sdpa_attention)
        reference = model(**args)
        apply_attention(model, kernel.int8fp8_attention)
        out = model(**args)
    assert 0 < rel(out, reference) < 0.02
