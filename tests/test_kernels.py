"""pipeline/kernels on the CPU: attention backends against a float64 reference and their start-up
errors; fp8 weight quantisation against an independent float64 e4m3 rounding; fp8 layers in a tiny
DiT; ComfyUI fp8 files loading bit for bit. GPU numbers are in benchmarks/RESULTS.md."""

import gc
import logging
import math
import weakref

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from pipeline.kernels import KernelUnavailable, attention
from pipeline.kernels.attention import (
    apply_attention,
    get_attention,
    sage_attention,
    sdpa_attention,
)
from pipeline.kernels.fp8 import FP8_KEEP, Fp8Linear, apply_fp8, quantise_weight
from pipeline.models.checkpoints import load_dit
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT

CFG = DiTConfig(
    dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=24, clip_dim=20, text_len=16, freq_dim=32,
    audio_dim=16, audio_layers=3, audio_hidden=32, audio_tokens=4,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- attention


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v in float64, NHD layout, written out with einsum."""
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", logits.softmax(dim=-1), v)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 300, 300, 4, 32), (3, 50, 17, 2, 64)])  # B, Lq, Lk, H, D
def test_sdpa_matches_float64_reference(dtype, bound, shape):
    b, lq, lk, h, d = shape
    gen = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(b, lq, h, d, generator=gen)  # fp32, as after RoPE
    k = torch.randn(b, lk, h, d, generator=gen)
    v = torch.randn(b, lk, h, d, generator=gen).to(dtype)
    out = sdpa_attention(q, k, v)
    assert out.shape == (b, lq, h, d) and out.dtype == dtype
    # the reference sees the same operands the backend is given: q and k cast to v's dtype
    assert rel(out, reference_attention(q.to(dtype), k.to(dtype), v)) < bound


def test_sage_routes_short_keys_to_sdpa():
    """Key lengths whose partial 64-key block would add too many unmasked keys (CLIP's 257, audio's
    32) never reach sageattention; on the CPU that path runs, and equals sdpa exactly."""
    assert attention.sage_phantom_keys(46_800) == 48 and attention.sage_phantom_keys(512) == 0
    assert attention.sage_phantom_keys(257) == 63 and attention.sage_phantom_keys(32) == 32
    for key_len in (257, 32):
        q, k, v = torch.randn(2, 40, 2, 64), torch.randn(2, key_len, 2, 64), torch.randn(2, key_len, 2, 64)
        assert torch.equal(sage_attention(q, k, v), sdpa_attention(q, k, v))


def test_unavailable_backends_are_startup_errors_that_say_what_is_available():
    with pytest.raises(KernelUnavailable, match=r"'sage' is not available on cpu: .*available: \['sdpa'\]"):
        get_attention("sage", "cpu")
    with pytest.raises(KernelUnavailable, match=r"'nope' is unknown; known: \['int8fp8', 'sage', 'sdpa', 'auto'\]; available on cpu: \['sdpa'\]"):
        get_attention("nope", "cpu")
    assert get_attention("sdpa", "cpu") is sdpa_attention


def test_auto_picks_the_best_available_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.kernels.attention"):
        assert get_attention("auto", "cpu") is sdpa_attention
    assert "chose 'sdpa'" in caplog.text


def test_apply_attention_sets_every_attention_module():
    model = tiny_model()
    calls = []

    def recording(q, k, v):
        calls.append(k.shape[1])
        return sdpa_attention(q, k, v)

    apply_attention(model, recording)
    modules = [m for m in model.modules() if hasattr(m, "attend")]
    assert len(modules) == 3 * CFG.num_layers and all(m.attend is recording for m in modules)
    model(*tiny_inputs())
    # per block: self-attention (all tokens), text, image, audio (per frame: 4 tokens x 1 speaker)
    tokens = 3 * 4 * 4
    assert calls == [tokens, CFG.text_len, CFG.clip_tokens, CFG.audio_tokens] * CFG.num_layers
    apply_attention(model, "sdpa")
    assert all(m.attend is sdpa_attention for m in modules)
    with pytest.raises(KernelUnavailable, match="'sage'"):
        apply_attention(model, "sage")


# ---------------------------------------------------------------------------------------------- fp8 numerics


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest e4m3fn value (ties to even), written from the format:
    3 mantissa bits, exponent bias 7, smallest normal 2^-6, subnormal step 2^-9, largest 448."""
    a = x.abs()
    exponent = torch.floor(torch.log2(a.clamp_min(2.0**-30))).clamp_min(-6)
    step = torch.exp2(exponent - 3)
    return torch.sign(x) * (torch.round(a / step) * step).clamp_max(448.0)


def test_weight_quantisation_round_trip_against_float64():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 200, generator=gen, dtype=torch.float64)
    w[3] *= 1e-3  # rows of very different magnitude: per-channel scales handle each
    w[5] *= 1e3
    w[7] = 0.0  # a zero row quantises to zeros
    q, scale = quantise_weight(w.to(torch.bfloat16).float())
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (96,)
    wb = w.to(torch.bfloat16).double()  # what the layer was given
    got = q.double() * scale.double()[:, None]
    assert torch.all(got[7] == 0)

    ref_scale = wb.abs().amax(dim=1) / 448.0
    ok = ref_scale > 0
    torch.testing.assert_close(scale.double()[ok], ref_scale[ok], rtol=1e-6, atol=0)
    ref = e4m3_round(wb[ok] / ref_scale[ok, None]) * ref_scale[ok, None]
    # the same grid point as float64 rounding, except where fp32 division lands on the other side of
    # a tie (rare); never more than one e4m3 step away
    same = (got[ok] - ref).abs() <= 1e-6 * ref.abs()
    assert same.float().mean() > 0.999
    # the format's bound: half a step, 2^-4 relative for normals, 2^-10 * scale for subnormals
    bound = torch.maximum(wb[ok].abs() * 2.0**-4, ref_scale[ok, None] * 2.0**-10) * (1 + 1e-6)
    assert torch.all((got[ok] - wb[ok]).abs() <= bound)
    # and over a Gaussian matrix the relative Frobenius error is ~2.5% (uniform rounding in a
    # 3-bit mantissa), far under the 2^-4 worst case
    assert 0.01 < rel(got[ok], wb[ok]) < 0.04


def test_fp8_weights_linear_equals_dequantised_matmul():
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(48, 32)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05, generator=gen)
        linear.bias.normal_(0, 0.05, generator=gen)
    bias = linear.bias.detach().clone()
    layer = Fp8Linear.from_linear(linear, "fp8_weights")
    assert linear.weight is None  # the full-precision weight is gone
    x = torch.randn(5, 7, 48, generator=gen)
    w = layer.weight.double() * layer.scale_weight.double()[:, None]
    torch.testing.assert_close(layer(x).double(), x.double() @ w.T + bias.double(), rtol=1e-5, atol=1e-6)


def test_fp8_mode_off_gpu_is_a_startup_error():
    model = tiny_model()
    with pytest.raises(KernelUnavailable, match=r"mode 'fp8' is not available on cpu: .*capability >= 8.9.*available: \['fp8_weights'\]"):
        apply_fp8(model, "fp8")
    with pytest.raises(KernelUnavailable, match=r"'int4' is unknown; known: \['fp8', 'fp8_weights'\]"):
        apply_fp8(model, "int4")
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())  # refused before any change


# ---------------------------------------------------------------------------------------------- fp8 in the DiT


def expected_fp8_layers(cfg: DiTConfig) -> set[str]:
    """Every nn.Linear of the blocks, from the official names (reference doc section 2), minus FP8_KEEP."""
    per_block = [f"self_attn.{m}" for m in "qkvo"]
    per_block += [f"cross_attn.{m}" for m in ("q", "k", "v", "o", "k_img", "v_img")]
    per_block += [f"audio_cross_attn.{m}" for m in ("q_linear", "kv_linear", "proj")] + ["ffn.0", "ffn.2"]
    return {f"blocks.{n}.{m}" for n in range(cfg.num_layers) for m in per_block if m not in FP8_KEEP}


def tiny_model(seed: int = 0) -> WanInfiniteTalkDiT:
    """Random weights at a scale that keeps activations O(1): linears ~ 1/sqrt(fan in)."""
    torch.manual_seed(seed)
    model = WanInfiniteTalkDiT(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif ".norm" not in name and not name.startswith(("img_emb.proj.0", "img_emb.proj.4")):
                p.normal_(0, 0.02)
    return model.eval()


def tiny_inputs_for(cfg: DiTConfig, seed: int = 1, frames: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 8, 8, generator=gen)
    y = torch.randn(1, 20, frames, 8, 8, generator=gen)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    clip = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=gen)
    audio = torch.randn(1, 1, 4 * frames - 3, 5, cfg.audio_layers, cfg.audio_dim, generator=gen)
    return x, torch.tensor([500.0]), text, clip, y, audio


def tiny_inputs(seed: int = 1, frames: int = 3):
    return tiny_inputs_for(CFG, seed, frames)


FP8_TINY_BOUND = 0.05  # relative error of the tiny DiT's output with fp8 weights (measured 0.022-0.025, 4 seeds)


def test_apply_fp8_replaces_exactly_the_block_linears_and_stays_close():
    model = tiny_model()
    inputs = tiny_inputs()
    with torch.no_grad():
        reference = model(*inputs)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in expected_fp8_layers(CFG)}
    probe = weakref.ref(model.blocks[0].ffn[0].weight)

    layers = apply_fp8(model, "fp8_weights")
    assert set(layers) == expected_fp8_layers(CFG)
    assert {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)} == expected_fp8_layers(CFG)
    left = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # embeddings, head, audio_proj, and in the blocks only the FP8_KEEP layers stay nn.Linear
    assert {n for n in left if not n.startswith("blocks.")} == {
        "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
        "img_emb.proj.1", "img_emb.proj.3", "head.head", "audio_proj.proj1", "audio_proj.proj1_vf",
        "audio_proj.proj2", "audio_proj.proj3",
    }
    assert {n for n in left if n.startswith("blocks.")} == {
        f"blocks.{i}.{m}" for i in range(CFG.num_layers) for m in FP8_KEEP
    }
    for name, p in model.named_parameters():  # nothing else touched
        if name in others:
            assert torch.equal(p, others[name]), name
    gc.collect()
    assert probe() is None  # the fp32 weight was freed, not kept beside its fp8 copy

    with torch.no_grad():
        out = model(*inputs)
    assert torch.isfinite(out).all()
    err = rel(out, reference)
    assert 1e-4 < err < FP8_TINY_BOUND, err


# ---------------------------------------------------------------------------------------------- loading


def write_comfy_fp8(state: dict[str, torch.Tensor], path, per_tensor: bool) -> dict[str, torch.Tensor]:
    """A ComfyUI-style scaled-fp8 single file: prefixed original names, every 2-D `blocks.` weight in
    e4m3 with `scale_weight` (a scalar, or one per output channel), a `scaled_fp8` marker, the audio
    modules merged in. Returns what was written, by original name."""
    out, written = {"model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, tensor in state.items():
        if tensor.dim() == 2 and key.startswith("blocks."):
            t = tensor.float()
            scale = t.abs().amax() / 448.0 if per_tensor else t.abs().amax(dim=1) / 448.0
            q = (t / (scale if per_tensor else scale[:, None])).to(torch.float8_e4m3fn)
            layer = key.removesuffix(".weight")
            written[key], written[layer + ".scale_weight"] = q, scale.reshape(()) if per_tensor else scale
        else:
            written[key] = tensor
    save_file({"model.diffusion_model." + k: v for k, v in written.items()} | out, path)
    return written


@pytest.mark.parametrize("per_tensor", [False, True])
def test_comfyui_fp8_file_loads_into_fp8_layers_bit_for_bit(tiny, tiny_dit_state, tmp_path, per_tensor):
    single = tmp_path / "Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors"
    written = write_comfy_fp8(tiny_dit_state, single, per_tensor)
    dit = load_dit([single], None, tiny.dit_config(), dtype=torch.bfloat16, quant="fp8_weights")
    modules = dict(dit.named_modules())
    fp8_names = {n for n, m in modules.items() if isinstance(m, Fp8Linear)}
    assert fp8_names == expected_fp8_layers(dit.cfg)
    for name in fp8_names:
        layer = modules[name]
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.weight.view(torch.uint8), written[name + ".weight"].view(torch.uint8)), name
        want = written[name + ".scale_weight"].float().expand(layer.out_features)
        assert torch.equal(layer.scale_weight, want), name
    # the rest as the file has it, in the load's dtypes; fp8 layers we keep in bf16 (FP8_KEEP) are
    # de-quantised with their scale
    state = dit.state_dict()
    for key, tensor in written.items():
        layer = key.rsplit(".", 1)[0]
        if layer in fp8_names or key.endswith(".scale_weight"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale = written[layer + ".scale_weight"]
            tensor = tensor.float() * (scale if per_tensor else scale[:, None])
        assert torch.equal(state[key], tensor.to(state[key].dtype)), key
    kept = [n for n in written if n.endswith(tuple(f".{m}.weight" for m in FP8_KEEP))]
    assert kept and all(state[n].dtype == torch.bfloat16 for n in kept)


def test_official_shards_quantise_on_load(tiny, tiny_dit_state):
    plain = load_dit(tiny.dit_files(), tiny.infinitetalk, tiny.dit_config(), dtype=torch.float32)
    quantised = load_dit(tiny.dit_files(), tiny.infinitetalk, tiny.dit_config(), dtype=torch.float32, quant="fp8_weights")
    files = tiny_dit_state
    layers = {n: m for n, m in quantised.named_modules() if isinstance(m, Fp8Linear)}
    assert set(layers) == expected_fp8_layers(quantised.cfg)
    for name, layer in layers.items():
        q, scale = quantise_weight(files[name + ".weight"].float())
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(layer.scale_weight, scale)
    # everything else loads as without quant, and the forward stays close
    kept = dict(plain.named_parameters())
    for name, p in quantised.named_parameters():
        if name.rsplit(".", 1)[0] not in layers:
            assert torch.equal(p, kept[name]), name
    with torch.no_grad():
        inputs = tiny_inputs_for(quantised.cfg)
        assert rel(quantised(*inputs), plain(*inputs)) < FP8_TINY_BOUND
    with pytest.raises(KernelUnavailable, match="'fp8' is not available on cpu"):
        load_dit(tiny.dit_files(), tiny.infinitetalk, tiny.dit_config(), quant="fp8")
