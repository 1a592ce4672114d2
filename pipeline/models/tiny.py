"""A tiny InfiniteTalk: the real architecture at toy widths, with seeded random weights, written to
disk in the official layout so that tests, CI and the CPU demo go through the real loaders.

    <root>/Wan2.1-I2V-tiny/config.json
                           diffusion_pytorch_model-0000{1,2}-of-00002.safetensors (+ index.json)
                           models_t5_umt5-xxl-enc-bf16.pth
                           models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
                           Wan2.1_VAE.pth
                           google/umt5-xxl/        (tokenizer, generated here)
    <root>/InfiniteTalk/single/infinitetalk.safetensors   (audio modules only, fp32)
    <root>/chinese-wav2vec2-base/                          (Hugging Face format)

Its video is noise: it proves the plumbing, not the quality. Same seed, same bytes.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from pipeline.models.audio import write_tiny_wav2vec2
from pipeline.models.checkpoints import (
    WAN_CLIP, WAN_CONFIG, WAN_T5, WAN_T5_TOKENIZER, WAN_VAE, CheckpointPaths, key_kind,
)
from pipeline.models.clip import CLIP_NUM_HEADS, clip_state_dict_to_official, clip_unused_official_tensors
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT
from pipeline.models.text import t5_state_dict_to_official, write_tiny_t5_tokenizer
from pipeline.models.vae import vae_state_dict_to_official

# Fields of the official config.json, at toy size (head_dim 16 keeps all three RoPE parts non-empty).
TINY_WAN_CONFIG = dict(
    model_type="i2v", dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=36, out_dim=16,
    text_len=512, freq_dim=32, eps=1e-6,
)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, vocab_size=256)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, image_size=224, patch_size=14)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TINY_AUDIO = dict(audio_hidden=32, audio_tokens=4)  # wav2vec2 width and depth come from write_tiny_wav2vec2
DIT_SHARDS = 2
DONE = ".complete"  # written last: a directory without it is half-written and is rewritten


def tiny_checkpoint_paths(root: str | Path) -> CheckpointPaths:
    """Where write_tiny_checkpoints(root) writes the set; reads and writes nothing."""
    root = Path(root)
    return CheckpointPaths(
        wan_dir=root / "Wan2.1-I2V-tiny",
        infinitetalk=root / "InfiniteTalk" / "single" / "infinitetalk.safetensors",
        wav2vec_dir=root / "chinese-wav2vec2-base",
    )


def write_tiny_checkpoints(root: str | Path, seed: int = 0) -> CheckpointPaths:
    """Write the tiny set under `root` (if not already complete) and return its paths."""
    root = Path(root)
    paths = tiny_checkpoint_paths(root)
    if (root / DONE).is_file():
        return paths
    paths.wan_dir.mkdir(parents=True, exist_ok=True)
    paths.infinitetalk.parent.mkdir(parents=True, exist_ok=True)

    write_tiny_wav2vec2(paths.wav2vec_dir, seed)
    wav2vec = json.loads((paths.wav2vec_dir / "config.json").read_text())
    write_tiny_t5_tokenizer(paths.wan_dir / WAN_T5_TOKENIZER, TINY_T5["vocab_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = UMT5EncoderModel(UMT5Config(**TINY_T5, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6))
        t5_official = t5_state_dict_to_official(t5.to(torch.bfloat16).state_dict())  # the official file is bf16
        torch.save(_contiguous(t5_official), paths.wan_dir / WAN_T5)

        torch.manual_seed(seed + 1)
        clip = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP, num_attention_heads=CLIP_NUM_HEADS, hidden_act="gelu"))
        official = clip_state_dict_to_official(clip.state_dict())
        official |= clip_unused_official_tensors(TINY_CLIP["hidden_size"], torch.Generator().manual_seed(seed))
        torch.save(_contiguous(official), paths.wan_dir / WAN_CLIP)

        torch.manual_seed(seed + 2)
        vae = AutoencoderKLWan(**TINY_VAE)
        torch.save(_contiguous(vae_state_dict_to_official(vae.state_dict())), paths.wan_dir / WAN_VAE)

        torch.manual_seed(seed + 3)
        _write_dit(paths, tiny_dit_config(wav2vec))
    (paths.wan_dir / WAN_CONFIG).write_text(json.dumps(TINY_WAN_CONFIG, indent=2) + "\n")
    (root / DONE).write_text("")
    return paths


def tiny_dit_config(wav2vec: dict) -> DiTConfig:
    """The tiny DiT at the widths of the tiny encoders; `wav2vec` is its wav2vec2's config.json."""
    return DiTConfig(
        **{k: v for k, v in TINY_WAN_CONFIG.items() if k != "model_type"},
        text_dim=TINY_T5["d_model"], clip_dim=TINY_CLIP["hidden_size"],
        audio_dim=wav2vec["hidden_size"], audio_layers=wav2vec["num_hidden_layers"], **TINY_AUDIO,
    )


def _write_dit(paths: CheckpointPaths, cfg: DiTConfig) -> None:
    """DiT shards and the InfiniteTalk file from a seeded model (fp32, as the official files)."""
    dit = WanInfiniteTalkDiT(cfg)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "modulation" in name:  # the official init: randn / sqrt(dim)
                p.copy_(torch.randn(p.shape) / cfg.dim**0.5)
    state = _contiguous(dit.state_dict())
    write_dit_checkpoint(paths, cfg, DIT_SHARDS, lambda name, shape: state[name])


def write_dit_checkpoint(paths: CheckpointPaths, cfg: DiTConfig, shards: int,
                         tensor: Callable[[str, torch.Size], torch.Tensor]) -> None:
    """The DiT of `cfg` in the official layout: the Wan keys in `shards` safetensors files (whole
    blocks per shard) with their index, the InfiniteTalk audio modules in `paths.infinitetalk`.
    `tensor(name, shape)` gives each tensor, asked for one file at a time, so that only one file's
    tensors are in memory at once (the 14B's shards are written this way by benchmarks/bench_load.py)."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in WanInfiniteTalkDiT(cfg).state_dict().items()}
    audio = [k for k in shapes if key_kind(k) == "InfiniteTalk audio modules"]
    save_file({k: tensor(k, shapes[k]) for k in audio}, paths.infinitetalk, metadata={"format": "pt"})

    blocks_per_shard = -(-cfg.num_layers // shards)
    weight_map, total = {}, 0
    for key in sorted(set(shapes) - set(audio)):
        block = int(key.split(".")[1]) if key.startswith("blocks.") else 0
        weight_map[key] = f"diffusion_pytorch_model-{block // blocks_per_shard + 1:05d}-of-{shards:05d}.safetensors"
    for shard in sorted(set(weight_map.values())):
        tensors = {k: tensor(k, shapes[k]) for k, s in weight_map.items() if s == shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, paths.wan_dir / shard, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (paths.wan_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Own, contiguous copies: safetensors refuses shared or strided storage, and torch.save of a
    view would write its whole base tensor."""
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
