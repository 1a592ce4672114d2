"""The paths that run only on CUDA, on a GPU machine; skipped elsewhere (CPU CI cannot see them).

- The README's demo through the talkfarm CLI with each memory preset and quant mode.
- The tiny model's windows on CUDA against the CPU, in fp32.
- One job through every code path that runs only on CUDA: the VAE's cuDNN layout, compiled blocks and
  VAE, fp8 GEMMs, block offload, a tiled VAE; the int8fp8 kernel refuses the tiny model's head dim
  (it runs natively in tests/test_attention_int8fp8.py, which the GPU command runs too).

    python -m pytest tests/test_gpu.py        (README, "Contributing")
"""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from farm.storage import RunStore
from pipeline import media
from pipeline.assemble import MemorySettings, ModelSpec, build_renderer
from pipeline.job import Job, RenderSettings
from pipeline.kernels import KernelUnavailable
from pipeline.models.checkpoints import Precision, load_models
from pipeline.models.vae import VAETiling
from pipeline.render import encode_job, render_windows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "jobs" / "demo"
JOB = Job(id="demo", audio=(str(DEMO / "speech.wav"),), image=str(DEMO / "astronaut.png"), prompt="a woman talks", seed=7)
# The demo's settings (preset=demo) with one guidance pass: 33-frame windows, 9 of motion.
SETTINGS = RenderSettings(window=33, motion=9, scheduler="euler", steps=4, shift=5.0, text_scale=1.0, audio_scale=1.0,
                          size="128x128")
FP32 = Precision(dit="fp32", t5="fp32", clip="fp32", vae="fp32")


ENCODERS = ["t5", "clip", "wav2vec"]


def windows(models, inputs, settings, tmp_path, count=2):
    """The first `count` windows' decoded frames: the second opens on the first's motion latents."""
    reports = itertools.islice(render_windows(models, JOB, inputs, settings, tmp_path, keep_frames=True), count)
    return torch.cat([r.frames.float() for r in reports])


def encoded(tiny, settings=SETTINGS):
    return encode_job(load_models(tiny, FP32, "cpu", ENCODERS), JOB, settings)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def no_tf32():
    """CUDA's fp32 matmuls and convolutions in full fp32, so that CUDA and CPU compute the same thing."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("memory, quant", [
    ("none", "none"), ("fast", "none"), ("fast", "fp8"), ("24gb", "fp8"), ("24gb", "fp8_weights"), ("12gb", "fp8_weights"),
])
def test_the_demo_renders_through_the_cli(memory, quant, tmp_path):
    """README: `talkfarm manifest=jobs/demo/manifest.jsonl preset=demo`, on the GPU, with the preset."""
    root = tmp_path / "run"
    command = [sys.executable, "-m", "farm.cli", "manifest=jobs/demo/manifest.jsonl", "preset=demo", "model.device=cuda",
               f"memory={memory}", f"quant={quant}", f"storage.root={root}", f"model.dir={tmp_path / 'tiny'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    store = RunStore(str(root))
    rows = store.read_results()
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows), rows
    for row in rows:
        info = media.probe(row["output"])
        assert info.video.frame_count == row["frames"] == 97 and info.audio is not None  # 3.86 s at 25 fps
        assert row["dit_seconds"] > 0 and row["device_seconds_per_video_second"] > 0, row
        for record in store.read_window_log(row["id"]):  # the GPU's peaks, weights included
            assert 0 < record["peak_allocated"] <= record["peak_reserved"], record


def test_the_tiny_model_renders_on_cuda_as_on_the_cpu(tiny, tmp_path, no_tf32):
    on_cpu, on_cuda = load_models(tiny, FP32, "cpu"), load_models(tiny, FP32, "cuda")
    inputs = encode_job(on_cpu, JOB, SETTINGS)
    for name in ("text", "audio", "clip_tokens"):  # the encoders, on CUDA
        torch.testing.assert_close(getattr(encode_job(on_cuda, JOB, SETTINGS), name), getattr(inputs, name),
                                   rtol=1e-4, atol=1e-4)
    cpu = windows(on_cpu, inputs, SETTINGS, tmp_path / "cpu")
    cuda = windows(on_cuda, inputs, SETTINGS, tmp_path / "cuda")
    error = (cuda - cpu).abs().max().item()
    print(f"CUDA against CPU, fp32, 2 windows: max |difference| {error:.2e}, relative {rel(cuda, cpu):.2e}")
    assert error < 1e-3


def renderer(tiny, attention="sdpa", quant=None, precision=Precision(), **memory):
    return build_renderer(tiny, ModelSpec(precision, attention, quant, MemorySettings(**memory)), "cuda")


def test_every_cuda_only_path_renders_a_job(tiny, tmp_path, no_tf32):
    """In fp32, where the paths must agree closely: eager against laid out and compiled, offloaded
    against on the GPU. In bf16 with fp8 GEMMs (one fp8 layer path each: quantised while loading on the
    GPU, loaded as fp8_weights and switched after offload, fp8_weights with a tiled VAE) each renders;
    on the tiny random model bf16 rounding alone moves its frames by several percent, so those are
    printed, not bounded."""
    inputs = encoded(tiny)

    def frames(name, precision=FP32, **kwargs):
        return windows(renderer(tiny, precision=precision, **kwargs), inputs, SETTINGS, tmp_path / name)

    eager = frames("eager")
    models = renderer(tiny, precision=FP32, compile=True)
    assert models.vae.memory_format == torch.channels_last_3d  # the cuDNN layout, applied on CUDA untiled
    assert all("forward" in vars(block) for block in models.dit.blocks)
    fast = windows(models, inputs, SETTINGS, tmp_path / "fast")
    offloaded = frames("offload", compile=True, offload=True)
    print(f"fp32: laid out and compiled against eager {rel(fast, eager):.2e}, offloaded against not {rel(offloaded, fast):.2e}")
    assert rel(fast, eager) < 1e-3
    assert rel(offloaded, fast) < 1e-5

    bf16 = Precision()
    quantised = {
        "fp8": frames("fp8", bf16, quant="fp8", compile=True),
        "fp8 offloaded": frames("fp8-offload", bf16, quant="fp8", compile=True, offload=True),
        "fp8_weights, tiled VAE": frames("tiled", bf16, quant="fp8_weights", compile=True, offload=True,
                                         offload_ahead=1, vae_tiling=VAETiling(64, 64, 48, 48)),
    }
    for name, got in quantised.items():
        print(f"bf16, {name}: relative to fp32 eager {rel(got, eager):.2e}")
        assert got.shape == eager.shape and got.isfinite().all()


def test_int8fp8_refuses_the_tiny_models_head_dim_at_start_up(tiny):
    """Hopper's int8 dot needs a head dim of 32 or more; the tiny DiT's is 16. The kernel itself runs
    natively in tests/test_attention_int8fp8.py, on this machine too."""
    with pytest.raises(KernelUnavailable, match="supports head dims .* the model has 16"):
        renderer(tiny, "int8fp8")
