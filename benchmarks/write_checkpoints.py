"""A full-size InfiniteTalk checkpoint set with random weights, in the layouts the README tells users to
download, for measuring the farm at 14B where the real weights cannot be downloaded. The real loaders
read it (`talkfarm model=infinitetalk_14b model.weights=<dir>`).

    python benchmarks/write_checkpoints.py --dir /ckpt               # the official layout, ~52 GB
    python benchmarks/write_checkpoints.py --dir /ckpt --comfy-dit   # and the ComfyUI fp8 DiT file, ~17 GB
    python benchmarks/write_checkpoints.py --dir /tmp/small --tiny   # the same code at the tiny widths

    <dir>/Wan2.1-I2V-14B-480P/  config.json, 7 DiT shards + index (bf16; fp32 norms, modulation and head:
                                the official shards are fp32, 66 GB, which a 64 GB disk does not hold
                                beside the rest), models_t5_umt5-xxl-enc-bf16.pth (bf16, as official),
                                models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (fp16, the visual
                                tower and stand-ins for the rest: the loader reads only the tower),
                                Wan2.1_VAE.pth (fp32, as official), google/umt5-xxl/ (the generated
                                tokenizer: the real sentencepiece model cannot be downloaded here; its ids
                                index the full embedding)
    <dir>/InfiniteTalk/single/infinitetalk.safetensors   bf16 (the official is fp32, 10 GB)
    <dir>/chinese-wav2vec2-base/                          fp32, Hugging Face layout, wav2vec2-base widths
    <dir>/Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors      --comfy-dit: e4m3fn block linears with their
                                                          scale_weight, the rest bf16 (model.dit_file)

Weights are N(0, 0.02) (the VAE and wav2vec2 take their libraries' own initialisation), drawn on the GPU
one file at a time, so host memory holds at most one file.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKLWan  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel, Wav2Vec2Config  # noqa: E402

from pipeline.models import tiny  # noqa: E402
from pipeline.models.audio import write_tiny_wav2vec2, write_wav2vec2  # noqa: E402
from pipeline.models.checkpoints import (  # noqa: E402
    FP8_MARKER, FP8_SCALE, WAN_CLIP, WAN_CONFIG, WAN_T5, WAN_T5_TOKENIZER, WAN_VAE, CheckpointPaths, key_kind,
)
from pipeline.models.clip import CLIP_NUM_HEADS, clip_state_dict_to_official, clip_unused_official_tensors  # noqa: E402
from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT, keeps_fp32  # noqa: E402
from pipeline.models.text import t5_state_dict_to_official, write_tiny_t5_tokenizer  # noqa: E402
from pipeline.models.vae import vae_state_dict_to_official  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHARDS = 7  # as the official folder
COMFY_DIT = "Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors"
CONFIG_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len", "freq_dim", "eps")
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24, vocab_size=256384)
VIT_HUGE_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, image_size=224, patch_size=14)
TOKENIZER_PIECES = 868  # the generated tokenizer's whole vocabulary (pipeline.models.text)


def official_paths(root: Path) -> CheckpointPaths:
    return CheckpointPaths(wan_dir=root / "Wan2.1-I2V-14B-480P",
                           infinitetalk=root / "InfiniteTalk" / "single" / "infinitetalk.safetensors",
                           wav2vec_dir=root / "chinese-wav2vec2-base")


def random_tensors(shapes: dict[str, torch.Size], dtype_of, seed: int) -> dict[str, torch.Tensor]:
    """N(0, 0.02) tensors of `shapes` on the CPU, in dtype_of(name), drawn on DEVICE from `seed`."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    return {name: (torch.randn(shape, device=DEVICE, generator=generator) * 0.02).to(dtype_of(name)).cpu()
            for name, shape in shapes.items()}


def meta_state_shapes(build) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: t.shape for name, t in build().items()}


def write_dit(root: Path, cfg: DiTConfig, audio_dtype: torch.dtype) -> None:
    """The DiT shards (bf16, fp32 where the model keeps fp32), their index and config.json, and the
    InfiniteTalk audio file in `audio_dtype`."""
    paths = official_paths(root)
    paths.wan_dir.mkdir(parents=True, exist_ok=True)
    paths.infinitetalk.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(DEVICE).manual_seed(0)

    def tensor(name: str, shape: torch.Size) -> torch.Tensor:
        dtype = audio_dtype if key_kind(name) == "InfiniteTalk audio modules" else \
            torch.float32 if keeps_fp32(name) else torch.bfloat16
        return (torch.randn(shape, device=DEVICE, generator=generator) * 0.02).to(dtype).cpu()

    tiny.write_dit_checkpoint(paths, cfg, SHARDS, tensor)
    config = {"model_type": "i2v"} | {name: getattr(cfg, name) for name in CONFIG_FIELDS}
    (paths.wan_dir / WAN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_comfy_dit(root: Path, cfg: DiTConfig) -> Path:
    """ComfyUI's fp8 single file of the DiT (no audio modules: those stay in the InfiniteTalk file):
    prefixed names, e4m3fn block linears with a per-output-channel scale_weight, the `scaled_fp8` marker."""
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in WanInfiniteTalkDiT(cfg).state_dict().items()
                  if key_kind(k) != "InfiniteTalk audio modules"}
    generator = torch.Generator(DEVICE).manual_seed(1)
    out = {FP8_MARKER: torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, shape in shapes.items():
        weight = torch.randn(shape, device=DEVICE, generator=generator) * 0.02
        name = "model.diffusion_model." + key
        if weight.dim() == 2 and key.startswith("blocks."):
            scale = weight.abs().amax(dim=1).clamp_min(1e-8) / torch.finfo(torch.float8_e4m3fn).max
            out[name] = (weight / scale[:, None]).to(torch.float8_e4m3fn).cpu()
            out[name.removesuffix(".weight") + FP8_SCALE] = scale.cpu()
        else:
            out[name] = weight.to(torch.float32 if keeps_fp32(key) else torch.bfloat16).cpu()
    path = root / COMFY_DIT
    save_file(out, path, metadata={"format": "pt"})
    return path


def write_encoders_and_vae(root: Path, small: bool) -> None:
    """T5 (bf16), CLIP (fp16), the VAE (fp32), the tokenizer and wav2vec2, full size unless `small`."""
    paths = official_paths(root)
    paths.wan_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_t5_tokenizer(paths.wan_dir / WAN_T5_TOKENIZER, tiny.TINY_T5["vocab_size"] if small else TOKENIZER_PIECES)

    t5_config = UMT5Config(**(tiny.TINY_T5 if small else UMT5_XXL), feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
    shapes = meta_state_shapes(lambda: t5_state_dict_to_official(UMT5EncoderModel(t5_config).state_dict()))
    torch.save(random_tensors(shapes, lambda name: torch.bfloat16, seed=2), paths.wan_dir / WAN_T5)

    clip = tiny.TINY_CLIP if small else VIT_HUGE_14
    clip_config = CLIPVisionConfig(**clip, num_attention_heads=CLIP_NUM_HEADS, hidden_act="gelu")
    shapes = meta_state_shapes(lambda: clip_state_dict_to_official(CLIPVisionModel(clip_config).state_dict()))
    official = random_tensors(shapes, lambda name: torch.float16, seed=3)
    official |= clip_unused_official_tensors(clip["hidden_size"], torch.Generator().manual_seed(3))
    torch.save(official, paths.wan_dir / WAN_CLIP)

    torch.manual_seed(4)
    vae = AutoencoderKLWan(**tiny.TINY_VAE) if small else AutoencoderKLWan()
    state = {k: v.contiguous() for k, v in vae_state_dict_to_official(vae.state_dict()).items()}
    torch.save(state, paths.wan_dir / WAN_VAE)

    if small:
        write_tiny_wav2vec2(paths.wav2vec_dir, seed=5)
    else:  # chinese-wav2vec2-base: wav2vec2-base widths with a group-norm, bias-free CNN
        write_wav2vec2(paths.wav2vec_dir, Wav2Vec2Config(conv_bias=False, feat_extract_norm="group"), seed=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--comfy-dit", action="store_true", help=f"also write {COMFY_DIT}")
    parser.add_argument("--tiny", action="store_true", help="the tiny widths (a CPU is fine)")
    args = parser.parse_args()
    root = Path(args.dir)
    started = time.perf_counter()
    write_encoders_and_vae(root, args.tiny)
    wav2vec = json.loads((official_paths(root).wav2vec_dir / "config.json").read_text())
    cfg = tiny.tiny_dit_config(wav2vec) if args.tiny else DiTConfig()
    write_dit(root, cfg, torch.bfloat16)
    if args.comfy_dit:
        write_comfy_dit(root, cfg)
    sizes = {str(f.relative_to(root)): round(f.stat().st_size / 1e9, 3) for f in sorted(root.rglob("*")) if f.is_file()}
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "gb": round(sum(sizes.values()), 2),
                      "files_gb": sizes}, indent=1))


if __name__ == "__main__":
    main()
