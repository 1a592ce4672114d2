"""CLIP image encoder: official key layout -> transformers CLIPVisionModel, checked against a naive float64
forward written here from Wan's VisionTransformer formulas on the official keys."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

from pipeline.models.clip import (
    CLIPImageEncoder,
    clip_state_dict_to_official,
    clip_tensors_from_official,
    clip_unused_official_tensors,
    clip_vision_config_from_shapes,
)

# Tiny ViT with the real geometry (224 / patch 14 -> 256 patches + 1 class token) and the real 16 heads.
# Three blocks, so the wanted output (after all blocks but the last) is not simply after the first block.
HIDDEN, MLP, LAYERS, HEADS, PATCH, IMAGE = 32, 64, 3, 16, 14, 224
TOKENS = (IMAGE // PATCH) ** 2 + 1


def official_visual_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for the `visual.*` part of Wan's CLIP file, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "visual.patch_embedding.weight": randn(HIDDEN, 3, PATCH, PATCH, std=(3 * PATCH * PATCH) ** -0.5),
        "visual.cls_embedding": randn(1, 1, HIDDEN, std=1.0),
        "visual.pos_embedding": randn(1, TOKENS, HIDDEN, std=0.5),
        "visual.pre_norm.weight": 1 + randn(HIDDEN, std=0.1),
        "visual.pre_norm.bias": randn(HIDDEN, std=0.1),
    }
    for n in range(LAYERS):
        b = f"visual.transformer.{n}."
        sd[b + "norm1.weight"] = 1 + randn(HIDDEN, std=0.1)
        sd[b + "norm1.bias"] = randn(HIDDEN, std=0.1)
        sd[b + "attn.to_qkv.weight"] = randn(3 * HIDDEN, HIDDEN, std=HIDDEN**-0.5)
        sd[b + "attn.to_qkv.bias"] = randn(3 * HIDDEN, std=0.1)
        sd[b + "attn.proj.weight"] = randn(HIDDEN, HIDDEN, std=HIDDEN**-0.5)
        sd[b + "attn.proj.bias"] = randn(HIDDEN, std=0.1)
        sd[b + "norm2.weight"] = 1 + randn(HIDDEN, std=0.1)
        sd[b + "norm2.bias"] = randn(HIDDEN, std=0.1)
        sd[b + "mlp.0.weight"] = randn(MLP, HIDDEN, std=HIDDEN**-0.5)
        sd[b + "mlp.0.bias"] = randn(MLP, std=0.1)
        sd[b + "mlp.2.weight"] = randn(HIDDEN, MLP, std=MLP**-0.5)
        sd[b + "mlp.2.bias"] = randn(HIDDEN, std=0.1)
    sd["visual.post_norm.weight"] = 1 + randn(HIDDEN, std=0.1)
    sd["visual.post_norm.bias"] = randn(HIDDEN, std=0.1)
    return sd


def official_clip_file(seed: int = 0) -> dict[str, torch.Tensor]:
    """The visual tower plus stand-ins for the parts Wan never reads, as a tiny checkpoint holds them."""
    return official_visual_state_dict(seed) | clip_unused_official_tensors(HIDDEN, torch.Generator().manual_seed(seed))


def converted(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = {}
    for key, tensor in official.items():
        for hf_key, hf_tensor in clip_tensors_from_official(key, tensor):
            assert hf_key not in hf, f"{hf_key} produced twice"
            hf[hf_key] = hf_tensor
    return hf


def build_model(official: dict[str, torch.Tensor]) -> CLIPVisionModel:
    config = clip_vision_config_from_shapes({k: tuple(v.shape) for k, v in official.items()})
    model = CLIPVisionModel(config).eval()
    model.load_state_dict(converted(official), strict=True)
    return model


# --- naive reference: Wan's CLIPModel.visual (pre-norm ViT, exact GELU, use_31_block) in float64 ------


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def naive_clip_visual(sd: dict[str, torch.Tensor], frames: torch.Tensor) -> torch.Tensor:
    """frames [B, 3, H, W] in [-1, 1] -> [B, 257, D] (float64), the tokens after all blocks but the last."""
    w = {k: v.double() for k, v in sd.items() if k.startswith("visual.")}
    # Preprocessing: squash-resize bicubic (align_corners False, no antialias), to [0, 1], OpenAI mean/std.
    # Wan does it in float32 (the frame's dtype) before the model's autocast, and so does this reference:
    # the float32 rounding of the normalised pixels alone moves the output by up to ~3e-5 here.
    x = F.interpolate(frames.float(), size=(IMAGE, IMAGE), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = ((x - mean) / std).double()

    b = x.shape[0]
    # Patch embedding as a matmul over non-overlapping patches, flattened (channel, row, col) like the conv.
    patches = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [B, 3, 16, 16, P, P]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * PATCH * PATCH)  # [B, 256, 3*P*P]
    x = patches @ w["visual.patch_embedding.weight"].reshape(HIDDEN, -1).T
    x = torch.cat([w["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + w["visual.pos_embedding"]
    x = layer_norm(x, w["visual.pre_norm.weight"], w["visual.pre_norm.bias"])

    head_dim = HIDDEN // HEADS
    for n in range(LAYERS - 1):  # use_31_block: the last block is not run
        p = f"visual.transformer.{n}."
        h = layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
        qkv = h @ w[p + "attn.to_qkv.weight"].T + w[p + "attn.to_qkv.bias"]
        q, k, v = qkv.view(b, TOKENS, 3, HEADS, head_dim).unbind(2)  # each [B, L, H, d]
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim)
        attn = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(b, TOKENS, HIDDEN)
        x = x + attn @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
        h = gelu_erf(h @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"])
        x = x + h @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"]
    return x


# --- tests --------------------------------------------------------------------------------------------


def test_config_recovered_from_shapes():
    config = clip_vision_config_from_shapes({k: tuple(v.shape) for k, v in official_clip_file().items()})
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (HIDDEN, MLP, LAYERS)
    assert (config.image_size, config.patch_size, config.num_attention_heads) == (IMAGE, PATCH, HEADS)
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-5


def test_every_visual_key_converted_and_none_invented():
    official = official_clip_file()
    model = CLIPVisionModel(clip_vision_config_from_shapes({k: tuple(v.shape) for k, v in official.items()}))
    hf = converted(official)
    assert set(hf) == set(model.state_dict())
    skipped = {k for k, v in official.items() if not clip_tensors_from_official(k, v)}
    assert skipped == set(clip_unused_official_tensors(HIDDEN, torch.Generator()))
    assert any(k.startswith("textual.") for k in skipped)


def test_inverse_round_trips():
    official = official_clip_file()
    back = clip_state_dict_to_official(build_model(official).state_dict())
    visual = official_visual_state_dict()
    assert set(back) == set(visual)
    for key, tensor in visual.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize(
    "key", ["visual.transformer.0.attn.qkv.weight", "visual.proj", "encoder.layers.0.mlp.fc1.weight"]
)
def test_unknown_key_raises_naming_it(key):
    with pytest.raises(KeyError, match=re.escape(key)):
        clip_tensors_from_official(key, torch.zeros(1))


def test_encode_matches_naive_official_forward():
    official = official_clip_file()
    encoder = CLIPImageEncoder(build_model(official))
    # Not square and smaller than 224 on one side, larger on the other: the resize squashes.
    frames = torch.rand(2, 3, 120, 280, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = encoder.encode(frames)
    assert out.shape == (2, TOKENS, HIDDEN) and out.dtype == torch.float32
    reference = naive_clip_visual(official, frames)
    # float32 model vs float64 reference: observed max abs error 4.3e-6 on values up to 5.5 (and 4e-15
    # with the model in float64, so the formulas agree exactly).
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
