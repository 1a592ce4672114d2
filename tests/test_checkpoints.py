"""Loading through the real loaders from the tiny set written in the official layout: strictness,
wrong-slot refusals, precision policy, ComfyUI single files, determinism of the tiny writer, and the
host-memory peak of streaming."""

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.models.checkpoints import (
    CheckpointError, CheckpointPaths, ModelNotLoaded, Models, Precision, load_dit, load_models, load_vae,
)
from pipeline.models.tiny import write_tiny_checkpoints


def test_same_seed_same_bytes(tmp_path):
    a = write_tiny_checkpoints(tmp_path / "a", seed=0)
    write_tiny_checkpoints(tmp_path / "b", seed=0)
    c = write_tiny_checkpoints(tmp_path / "c", seed=1)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert a.infinitetalk.read_bytes() != c.infinitetalk.read_bytes()
    assert (a.wan_dir / "Wan2.1_VAE.pth").read_bytes() != (c.wan_dir / "Wan2.1_VAE.pth").read_bytes()


def test_official_layout_on_disk(tiny):
    config = json.loads((tiny.wan_dir / "config.json").read_text())
    assert config["model_type"] == "i2v" and "text_dim" not in config  # only the official fields
    index = json.loads((tiny.wan_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    audio = load_file(tiny.infinitetalk)
    assert all(k.startswith("audio_proj.") or ".norm_x." in k or ".audio_cross_attn." in k for k in audio)
    assert all(v.dtype == torch.float32 for v in audio.values())
    t5 = torch.load(tiny.t5(), weights_only=True)
    assert "token_embedding.weight" in t5 and t5["token_embedding.weight"].dtype == torch.bfloat16
    assert any(k.startswith("textual.") for k in torch.load(tiny.clip(), weights_only=True))


def test_all_components_load_and_the_dit_holds_the_file_tensors(tiny, tiny_dit_state):
    models = load_models(tiny, Precision(dit="fp32", t5="fp32", clip="fp32", vae="fp32"))
    assert all(getattr(models, name) is not None for name in Models.COMPONENTS)
    state = tiny_dit_state
    loaded = models.dit.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("component", ["dit", "t5", "clip"])
def test_every_tensor_lands_on_the_device_asked_for(tiny, component):
    """Buffers that no file holds (CLIP's position ids, made on the CPU in __init__) go to the device
    too: on CUDA, one left on the CPU failed every CLIP encode. The meta device stands in for CUDA."""
    loaded = getattr(load_models(tiny, device="meta", components=[component]), component)
    module = loaded if component == "dit" else loaded.model
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    assert any("position_ids" in name for name in tensors) or component != "clip"
    assert {name: t.device.type for name, t in tensors.items() if t.device.type != "meta"} == {}


def test_precision_reaches_the_modules_and_is_logged(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.models.checkpoints"):
        models = load_models(tiny, Precision(dit="bf16", t5="bf16", clip="fp16", vae="bf16"))
    dit = dict(models.dit.named_parameters())
    assert dit["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    assert dit["blocks.1.ffn.0.weight"].dtype == torch.bfloat16
    assert dit["blocks.0.modulation"].dtype == torch.float32
    assert dit["blocks.0.norm_x.weight"].dtype == torch.float32
    assert dit["head.head.weight"].dtype == torch.float32
    assert models.t5.model.dtype == torch.bfloat16
    assert models.clip.model.dtype == torch.float16
    assert models.vae.dtype == torch.bfloat16
    assert models.wav2vec.model.dtype == torch.float32
    dit_log = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded DiT"))
    assert "bfloat16 x" in dit_log and "float32 x" in dit_log


def test_bad_precision_names_the_component(tiny):
    with pytest.raises(ValueError, match="vae dtype 'fp8'"):
        load_models(tiny, Precision(vae="fp8"), components=["vae"])


def test_unloaded_component_is_a_clear_error(tiny):
    models = load_models(tiny, components=["vae"])
    with pytest.raises(ModelNotLoaded, match="the dit model is not loaded"):
        models.dit(None)


def copy_with(tiny: CheckpointPaths, tmp_path: Path, edit) -> CheckpointPaths:
    """The tiny set with the second DiT shard rewritten by `edit(state) -> state`."""
    wan = tmp_path / "wan"
    wan.mkdir()
    for f in tiny.wan_dir.iterdir():
        if f.is_file():
            (wan / f.name).write_bytes(f.read_bytes())
    shard = wan / "diffusion_pytorch_model-00002-of-00002.safetensors"
    save_file(edit(load_file(shard)), shard)
    return dataclasses.replace(tiny, wan_dir=wan)


def test_missing_key_is_named(tiny, tmp_path):
    paths = copy_with(tiny, tmp_path, lambda s: {k: v for k, v in s.items() if k != "blocks.1.ffn.2.bias"})
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e\.g\. blocks\.1\.ffn\.2\.bias"):
        load_dit(paths.dit_files(), paths.infinitetalk, paths.dit_config())


def test_unexpected_key_is_named_with_its_file(tiny, tmp_path):
    paths = copy_with(tiny, tmp_path, lambda s: s | {"blocks.1.lora_up.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(e\.g\. blocks\.1\.lora_up\.weight \(in .*00002-of-00002"):
        load_dit(paths.dit_files(), paths.infinitetalk, paths.dit_config())


def test_wrong_shape_is_named(tiny, tmp_path):
    paths = copy_with(tiny, tmp_path, lambda s: s | {"blocks.1.ffn.2.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.ffn\.2\.bias' in .* has shape \(3,\)"):
        load_dit(paths.dit_files(), paths.infinitetalk, paths.dit_config())


def test_missing_infinitetalk_file_is_explained(tiny):
    with pytest.raises(CheckpointError, match="InfiniteTalk audio file"):
        load_dit(tiny.dit_files(), None, tiny.dit_config())


@pytest.mark.parametrize(
    "slot, wrong, looks_like",
    [
        ("dit_file", "vae", "Wan VAE"),
        ("vae_file", "t5", "T5 text encoder"),
        ("t5_file", "clip", "CLIP"),
        ("clip_file", "infinitetalk", "InfiniteTalk audio modules"),
        ("infinitetalk", "dit", "Wan DiT"),
    ],
)
def test_a_file_in_the_wrong_slot_is_refused(tiny, slot, wrong, looks_like):
    files = {"vae": tiny.vae(), "t5": tiny.t5(), "clip": tiny.clip(), "infinitetalk": tiny.infinitetalk, "dit": tiny.dit_files()[0]}
    paths = dataclasses.replace(tiny, **{slot: files[wrong]})
    component = {"dit_file": "dit", "vae_file": "vae", "t5_file": "t5", "clip_file": "clip", "infinitetalk": "dit"}[slot]
    with pytest.raises(CheckpointError, match=f"looks like a {looks_like} checkpoint"):
        load_models(paths, components=[component])


def test_pth_is_never_unpickled_beyond_tensors(tmp_path):
    evil = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(1), "note": argparse.Namespace(run="code")}, evil)
    with pytest.raises(CheckpointError, match="not a readable tensor checkpoint"):
        load_vae(evil)


def comfy_single_file(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A ComfyUI-style fp8 file: prefixed original names, e4m3fn 2-D weights with per-output-channel
    `scale_weight`, a `scaled_fp8` marker, the audio modules merged in. Returns the de-quantised truth."""
    out, truth = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, tensor in state.items():
        name = "model.diffusion_model." + key
        if tensor.dim() == 2 and key.startswith("blocks."):
            scale = tensor.abs().amax(dim=1).clamp_min(1e-8) / 448.0
            q = (tensor / scale[:, None]).to(torch.float8_e4m3fn)
            out[name], out[name.removesuffix(".weight") + ".scale_weight"] = q, scale
            truth[key] = q.float() * scale[:, None]
        else:
            out[name] = truth[key] = tensor
    save_file(out, path)
    return truth


def test_comfyui_fp8_single_file_loads_dequantised(tiny, tiny_dit_state, tmp_path):
    single = tmp_path / "Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors"
    truth = comfy_single_file(tiny_dit_state, single)
    dit = load_dit([single], None, tiny.dit_config(), dtype=torch.float32)
    loaded = dit.state_dict()
    for key, tensor in truth.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0, msg=key)


def test_comfyui_fp16_infinitetalk_file_loads(tiny, tmp_path):
    fp16 = tmp_path / "Wan2_1-InfiniTetalk-Single_fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(tiny.infinitetalk).items()}, fp16)
    dit = load_dit(tiny.dit_files(), fp16, tiny.dit_config(), dtype=torch.float32)
    assert torch.equal(dit.audio_proj.proj2.weight, load_file(fp16)["audio_proj.proj2.weight"].float())


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, torch
    from pathlib import Path
    from pipeline.models.checkpoints import load_dit

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    peak, done = [0], threading.Event()
    def sample():  # RSS every millisecond while loading
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.001)

    wan = Path(sys.argv[1])
    shards = sorted(wan.glob("diffusion_pytorch_model-*.safetensors"))
    baseline = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    dit = load_dit(shards, wan / "audio.safetensors", wan / "config.json", "cpu", torch.bfloat16)
    done.set()
    sampler.join()
    print(json.dumps({"peak_growth": max(peak[0], rss()) - baseline}))
    """
)


def test_streaming_peak_host_memory_is_about_one_shard(tmp_path):
    """A 179 MB (fp32) DiT in 8 shards of <= 28 MB loaded as bf16 onto the CPU: the peak growth of the
    process is the model itself (89 MB) plus about one shard, not the whole checkpoint on top."""
    from pipeline.models.dit import DiTConfig, WanInfiniteTalkDiT

    cfg = DiTConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, text_dim=64, clip_dim=64, text_len=16,
                    freq_dim=64, audio_dim=32, audio_layers=2, audio_hidden=64, audio_tokens=4)
    torch.manual_seed(0)
    state = WanInfiniteTalkDiT(cfg).state_dict()
    audio = {k: v for k, v in state.items() if "audio" in k or "norm_x" in k}
    save_file(audio, tmp_path / "audio.safetensors")
    shard_sizes = []
    for n in range(cfg.num_layers):
        part = {k: v.contiguous() for k, v in state.items() if k not in audio and (k.startswith(f"blocks.{n}.") or (n == 0 and not k.startswith("blocks.")))}
        save_file(part, tmp_path / f"diffusion_pytorch_model-{n + 1:05d}-of-00008.safetensors")
        shard_sizes.append(sum(v.numel() * 4 for v in part.values()))
    config = {"model_type": "i2v", "dim": 512, "ffn_dim": 2048, "num_heads": 4, "num_layers": 8, "in_dim": 36,
              "out_dim": 16, "text_len": 16, "freq_dim": 64, "eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    total_fp32 = sum(v.numel() * 4 for v in state.values())
    model_bf16 = sum(v.numel() * 2 for v in state.values())
    del state, audio

    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    growth = json.loads(run.stdout.strip().splitlines()[-1])["peak_growth"]
    numbers = dict(growth=growth, model_bf16=model_bf16, shard=max(shard_sizes), checkpoint=total_fp32)
    assert growth > 0.9 * model_bf16, numbers  # the measurement sees the model being built
    # the model (bf16) + about one shard read (fp32) + allocator slack; naive loading would add the
    # whole checkpoint (179 MB) on top of the model
    assert growth < model_bf16 + 1.5 * max(shard_sizes) + 20e6, numbers


def test_the_benchmarks_full_size_writer_writes_what_the_loaders_read(tmp_path):
    """benchmarks/write_checkpoints.py at the tiny widths: the same code writes the 14B set on the GPU machine."""
    script = Path(__file__).parents[1] / "benchmarks" / "write_checkpoints.py"
    subprocess.run([sys.executable, str(script), "--dir", str(tmp_path), "--tiny", "--comfy-dit"], check=True,
                   capture_output=True)
    paths = CheckpointPaths(tmp_path / "Wan2.1-I2V-14B-480P", tmp_path / "InfiniteTalk/single/infinitetalk.safetensors",
                            tmp_path / "chinese-wav2vec2-base")
    models = load_models(paths, Precision(dit="fp32", t5="fp32", clip="fp32", vae="fp32"))
    tokens = models.t5.encode(["a test prompt"])[0]
    assert torch.isfinite(tokens).all()
    comfy = load_dit([tmp_path / "Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors"], paths.infinitetalk, paths.dit_config(),
                     dtype=torch.float32)
    assert comfy.state_dict().keys() == models.dit.state_dict().keys()
