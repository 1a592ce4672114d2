"""CLIP ViT-H/14 image encoder (the visual tower of Wan's
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`) on transformers' CLIPVisionModel.

The official file holds a whole XLM-RoBERTa CLIP; Wan reads only the visual tower, and from it only the
tokens after all blocks but the last. The functions here translate the visual keys to transformers'
(and back, for writing tiny test checkpoints) and infer the config from the tensor shapes;
`CLIPImageEncoder` reproduces the official preprocessing and output.
"""

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

# OpenAI CLIP normalisation, which Wan applies to this (non-SigLIP) tower.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Heads cannot be read from any shape (q, k, v are [hidden, hidden] for every head count). Wan's
# ViT-H/14 has 16 (clip_xlm_roberta_vit_h_14: vision_heads=16); tiny checkpoints keep 16 as well.
CLIP_NUM_HEADS = 16

# Parts of the official file that Wan never runs, dropped by the converter: the text tower, the
# contrastive projection of the pooled image token (`visual.head`, [hidden, embed_dim]) and the logit
# scale. `visual.post_norm` is not among them: CLIPVisionModel has a home for it (post_layernorm, used
# only for the pooled output), so it is loaded, which keeps strict loading and the round trip exact.
_UNUSED_PREFIXES = ("textual.",)
_UNUSED_KEYS = ("visual.head", "log_scale")

# Per-block tensors: official name after `visual.transformer.N.` -> transformers name after
# `encoder.layers.N.`. `attn.to_qkv` is handled apart: it holds q, k and v stacked.
_CLIP_BLOCK_KEYS = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
}
_CLIP_BLOCK_KEYS_INVERSE = {hf: official for official, hf in _CLIP_BLOCK_KEYS.items()}
_CLIP_TOP_KEYS = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",  # no bias: the tower has a pre-norm
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight",
    "visual.post_norm.bias": "post_layernorm.bias",
}
_CLIP_TOP_KEYS_INVERSE = {hf: official for official, hf in _CLIP_TOP_KEYS.items()}


def clip_vision_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> CLIPVisionConfig:
    """CLIPVisionConfig for the official visual tower, read from its tensor shapes (official key -> shape)."""
    num_layers = len({int(m[1]) for key in shapes if (m := re.match(r"visual\.transformer\.(\d+)\.", key))})
    hidden_size, _, patch_size, _ = shapes["visual.patch_embedding.weight"]  # [hidden, 3, patch, patch]
    num_patches = shapes["visual.pos_embedding"][1] - 1  # [1, 1 + grid * grid, hidden]
    grid = math.isqrt(num_patches)
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=shapes["visual.transformer.0.mlp.0.weight"][0],
        num_hidden_layers=num_layers,
        num_attention_heads=CLIP_NUM_HEADS,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",  # Wan's ViT-H uses exact (erf) GELU, not CLIP's usual quick_gelu
        layer_norm_eps=1e-5,
    )


def clip_tensors_from_official(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """transformers (key, tensor) pairs for one official tensor: [] for the parts Wan never uses, KeyError
    for a key the official CLIP file does not have."""
    if key.startswith(_UNUSED_PREFIXES) or key in _UNUSED_KEYS:
        return []
    if key in _CLIP_TOP_KEYS:
        return [(_CLIP_TOP_KEYS[key], tensor)]
    if key == "visual.cls_embedding":  # [1, 1, hidden] -> [hidden]
        return [("embeddings.class_embedding", tensor.reshape(-1))]
    if key == "visual.pos_embedding":  # [1, 1 + grid * grid, hidden] -> [1 + grid * grid, hidden]
        return [("embeddings.position_embedding.weight", tensor.squeeze(0))]
    m = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)", key)
    if m and m[2] in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
        # Wan splits the to_qkv output as view(..., 3, heads, head_dim): q, k, v are consecutive thirds.
        kind = m[2].rsplit(".", 1)[1]
        q, k, v = tensor.chunk(3, dim=0)
        prefix = f"encoder.layers.{m[1]}.self_attn"
        return [(f"{prefix}.q_proj.{kind}", q), (f"{prefix}.k_proj.{kind}", k), (f"{prefix}.v_proj.{kind}", v)]
    if m and m[2] in _CLIP_BLOCK_KEYS:
        return [(f"encoder.layers.{m[1]}.{_CLIP_BLOCK_KEYS[m[2]]}", tensor)]
    raise KeyError(f"unknown CLIP key {key!r}")


def clip_state_dict_to_official(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `clip_tensors_from_official` over a whole CLIPVisionModel state dict: the `visual.*`
    tensors of an official file. The parts the converter drops cannot be recovered; a tiny checkpoint adds
    stand-ins for them with `clip_unused_official_tensors`."""
    official = {}
    for key, tensor in hf_state_dict.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if key in _CLIP_TOP_KEYS_INVERSE:
            official[_CLIP_TOP_KEYS_INVERSE[key]] = tensor
        elif key == "embeddings.class_embedding":
            official["visual.cls_embedding"] = tensor.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            official["visual.pos_embedding"] = tensor.unsqueeze(0)
        elif m and m[2] in _CLIP_BLOCK_KEYS_INVERSE:
            official[f"visual.transformer.{m[1]}.{_CLIP_BLOCK_KEYS_INVERSE[m[2]]}"] = tensor
        elif m and (qkv := re.fullmatch(r"self_attn\.q_proj\.(weight|bias)", m[2])):
            kind = qkv[1]
            prefix = f"encoder.layers.{m[1]}.self_attn"
            stacked = [hf_state_dict[f"{prefix}.{p}_proj.{kind}"] for p in "qkv"]
            official[f"visual.transformer.{m[1]}.attn.to_qkv.{kind}"] = torch.cat(stacked, dim=0)
        elif m and re.fullmatch(r"self_attn\.[kv]_proj\.(weight|bias)", m[2]):
            continue  # stacked with q_proj above
        else:
            raise KeyError(f"unknown CLIPVisionModel key {key!r}")
    return official


def clip_unused_official_tensors(hidden_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Small stand-ins for the parts of the official file that Wan never reads (a few text-tower tensors,
    the image projection and the logit scale), for tiny checkpoints to exercise the converter's skipping.
    Names follow Wan's XLM-RoBERTa CLIP; the text tower is sized like the visual one."""
    return {
        "textual.token_embedding.weight": torch.randn(8, hidden_size, generator=generator),
        "textual.norm.weight": torch.ones(hidden_size),
        "textual.norm.bias": torch.zeros(hidden_size),
        "textual.head.0.weight": torch.randn(hidden_size, hidden_size, generator=generator),
        "visual.head": torch.randn(hidden_size, hidden_size, generator=generator),
        "log_scale": torch.tensor(math.log(1 / 0.07)),
    }


class CLIPImageEncoder:
    """Frames -> CLIP image tokens, as Wan's CLIPModel.visual computes them."""

    def __init__(self, model: CLIPVisionModel):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, H, W] in [-1, 1] -> [B, 1 + (224/14)^2 = 257, hidden].

        The output is the token sequence after all blocks but the last, without the post-norm (Wan's
        use_31_block). The last block is still run (transformers has no switch to stop early); it costs
        one block of 32 on a single image per job.
        """
        size = self.model.config.image_size
        x = frames.to(self.model.device, torch.float32)
        # Squash to size x size (no aspect-preserving crop), bicubic without antialiasing: Wan calls
        # F.interpolate with align_corners=False and antialias left at its default, False.
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5  # [-1, 1] -> [0, 1]; bicubic overshoot is not clamped, as in Wan
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std  # [B, 3, size, size]
        out = self.model(pixel_values=x.to(self.model.dtype), output_hidden_states=True)
        # hidden_states: the pre-normed embeddings, then the output of each block.
        return out.hidden_states[-2]  # [B, 257, hidden]
