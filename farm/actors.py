"""The Ray workers: encoders (T5, CLIP, wav2vec2), renderers (DiT + VAE, one per GPU) and the
finishing task (mux, verify, publish). Actors load their models once in __init__ and then work job
after job; everything a job produces is written through the RunStore as it is produced.
"""

import logging
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from farm.config import MemorySettings
from farm.errors import Loaded, as_worker_error
from farm.localize import local_copies
from farm.storage import RunStore
from pipeline import media
from pipeline.job import Job, RenderSettings
from pipeline.kernels import fp8
from pipeline.kernels.attention import apply_attention
from pipeline.kernels.compile import check_compile, compile_blocks
from pipeline.kernels.offload import check_offload, offload_blocks
from pipeline.models.vae_layout import apply_vae_layout
from pipeline.models.checkpoints import CheckpointPaths, Models, Precision, load_models
from pipeline.models.tiny import write_tiny_checkpoints
from pipeline.models.vae import compile_vae
from pipeline.parallel import apply_sequence_parallel
from pipeline.render import (
    JobInputs,
    ResumeState,
    encode_job,
    finish_job,
    plan_for,
    render_windows,
)

log = logging.getLogger(__name__)

# A group member that stops answering (its peer died) gives up after this long; the driver replaces
# the whole group as soon as it sees a member die, so this only bounds a hang.
GROUP_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class ModelSpec:
    """What every actor needs to load its models: plain data, sent from the driver."""

    paths: CheckpointPaths
    precision: Precision
    device: str  # "cuda" or "cpu"
    attention: str
    quant: str = "none"  # the DiT's quantisation (pipeline.kernels.fp8 modes)
    cpu_threads: int | None = None  # torch threads per actor on a CPU-only machine
    tiny: bool = False  # the tiny set is written where the actor runs (pods do not share the driver's disk)
    memory: MemorySettings = MemorySettings()  # compile, offload, VAE tiling, the encoders' device


def _prepare(spec: ModelSpec) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if spec.cpu_threads:
        torch.set_num_threads(spec.cpu_threads)
    if spec.tiny:
        write_tiny_checkpoints(spec.paths.wan_dir.parent)


def load_renderer_models(spec: ModelSpec) -> Models:
    """The DiT and the VAE on spec.device, as spec.memory says. With offload the DiT is loaded into host
    memory (it need not fit on the GPU) and its blocks are then kept there, page-locked, and streamed;
    fp8 GEMMs need the GPU only to run, so their layers are loaded as fp8_weights and switched after."""
    memory, quant = spec.memory, None if spec.quant == "none" else spec.quant
    if memory.offload:  # the kernel checks first, not after minutes of loading
        check_offload(spec.device)
    if memory.compile:
        check_compile(spec.device)
    if not memory.offload:
        models = load_models(spec.paths, spec.precision, spec.device, ["dit", "vae"], memory.vae_tiling, quant)
        return _apply(models, spec)
    if quant == "fp8":
        fp8.check_mode(quant, spec.device)
    dit = load_models(spec.paths, spec.precision, "cpu", ["dit"], dit_quant=quant and "fp8_weights").dit
    if quant == "fp8":
        fp8.apply_fp8(dit, quant, spec.device)
    offload_blocks(dit, spec.device, memory.offload_ahead)
    vae = load_models(spec.paths, spec.precision, spec.device, ["vae"], vae_tiling=memory.vae_tiling).vae
    return _apply(Models(dit=dit, vae=vae), spec)


def _apply(models: Models, spec: ModelSpec) -> Models:
    apply_attention(models.dit, spec.attention, spec.device)
    if models.vae.device.type == "cuda" and not models.vae.module.use_tiling:
        apply_vae_layout(models.vae)  # before compiling: the graphs do not guard on the weights' layout
    if spec.memory.compile:  # after the attention backend, which the compiled graph holds
        compile_blocks(models.dit, spec.device)
        compile_vae(models.vae)
    log.info("renderer memory settings: %s", spec.memory)
    return models


class CachedPrompts:
    """The T5 encoder with a cache by prompt: a manifest reuses a few prompts across thousands of rows."""

    def __init__(self, encoder):
        self.encoder, self.text_len, self._cache = encoder, encoder.text_len, {}

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            self._cache |= dict(zip(missing, (t.cpu() for t in self.encoder.encode(missing))))
        return [self._cache[p] for p in prompts]


@ray.remote
class Encoder:
    def __init__(self, spec: ModelSpec):
        self.models = Loaded(lambda: _load_encoders(spec))

    @ray.method(num_returns=2)
    def encode(self, job: Job, settings: RenderSettings) -> tuple[dict, JobInputs]:
        """(a small summary for the scheduler, the inputs for the renderer)."""
        models = self.models.get()
        with as_worker_error(), local_copies(job) as local_job:
            inputs = encode_job(models, local_job, settings)
        return {"frames": inputs.num_frames, "windows": len(plan_for(inputs.num_frames, settings))}, inputs


def _load_encoders(spec: ModelSpec) -> Models:
    _prepare(spec)
    device = spec.memory.encoder_device or spec.device
    loaded = load_models(spec.paths, spec.precision, device, components=["t5", "clip", "wav2vec"])
    return Models(t5=CachedPrompts(loaded.t5), clip=loaded.clip, wav2vec=loaded.wav2vec)


@ray.remote
class Renderer:
    """One GPU's renderer, or one member (`rank` of `world`) of a sequence-parallel group: the group's
    members run the same window loop in lockstep (pipeline.parallel), rank 0 stores and reports."""

    def __init__(self, spec: ModelSpec, run_root: str, name: str, rank: int = 0, world: int = 1, rendezvous: str = ""):
        self.name, self.rank = name, rank
        self.models = Loaded(lambda: _load_renderer(spec, rank, world, rendezvous))
        self.store = RunStore(run_root)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"talkfarm-{name}-{rank}-"))

    def render(self, job: Job, inputs: JobInputs, settings: RenderSettings, attempt: int):
        """Render the job from its last stored window on; yields a progress event after every window
        (a streaming generator, so the driver sees progress while the job runs). Ranks > 0 of a
        group compute along and yield nothing."""
        models = self.models.get()
        with as_worker_error():
            stored = self.store.load_state(job.id)
            names = list(stored.segments) if stored else []
            state = stored or ResumeState()
            workdir = self.scratch / job.id
            started = time.time()
            for report in render_windows(models, job, inputs, settings, workdir, state):
                if self.rank > 0:
                    Path(report.state.segments[-1]).unlink()
                    continue
                names.append(self.store.put_segment(job.id, report.state.segments[-1]))
                self.store.save_state(job.id, report.state, names)
                finished = time.time()
                self.store.append_window_log(job.id, {
                    "window": report.window.index, "attempt": attempt, "actor": self.name, "host": socket.gethostname(),
                    "started": started, "finished": finished, "seconds": finished - started,
                })
                Path(report.state.segments[-1]).unlink()
                started = finished
                yield {"job": job.id, "window": report.window.index + 1, "windows": report.windows, "actor": self.name}


def _load_renderer(spec: ModelSpec, rank: int, world: int, rendezvous: str) -> Models:
    _prepare(spec)
    models = load_renderer_models(spec)
    if world > 1:
        backend = "nccl" if spec.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
        apply_sequence_parallel(models.dit)
    return models


@ray.remote(num_cpus=1)
def finish(job: Job, inputs: JobInputs, output_name: str, run_root: str) -> dict:
    """Concatenate the stored segments, mux the original audio, verify, publish under `output_name`."""
    with as_worker_error():
        return _finish(job, inputs, output_name, run_root)


def _finish(job: Job, inputs: JobInputs, output_name: str, run_root: str) -> dict:
    store = RunStore(run_root)
    state = store.load_state(job.id)
    with tempfile.TemporaryDirectory(prefix="talkfarm-finish-") as tmp, local_copies(job) as local_job:
        tmp = Path(tmp)
        segments = store.fetch_segments(job.id, state.segments, tmp)
        local = finish_job(local_job, ResumeState(state.next_window, None, [str(s) for s in segments]), inputs, tmp / "out.mp4", tmp)
        info = media.probe(local)
        expected = inputs.num_frames
        problems = []
        if info.video is None or info.video.frame_count != expected:
            problems.append(f"{info.video.frame_count if info.video else 0} frames, expected {expected}")
        if info.audio is None:
            problems.append("no audio stream")
        elif abs(info.duration - expected / 25) > 1 / 25:
            problems.append(f"duration {info.duration:.3f} s, expected {expected / 25:.3f} s")
        if problems:
            raise RuntimeError(f"output failed verification: {'; '.join(problems)}")
        url = store.publish_output(local, output_name)
    return {"output": url, "frames": expected, "duration": expected / 25}
