"""The Ray workers: encoders (T5, CLIP, wav2vec2), renderers (DiT + VAE, one per GPU) and the
finishing task (mux, verify, publish). Actors load their models once in __init__ and then work job
after job; everything a job produces is written through the RunStore as it is produced.
"""

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from farm.localize import local_copies
from farm.storage import RunStore
from pipeline import media
from pipeline.job import Job, RenderSettings
from pipeline.kernels.attention import apply_attention
from pipeline.models.checkpoints import CheckpointPaths, Models, Precision, load_models
from pipeline.models.tiny import write_tiny_checkpoints
from pipeline.render import JobInputs, ResumeState, encode_job, finish_job, plan_for, render_windows

log = logging.getLogger(__name__)


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


def _prepare(spec: ModelSpec) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if spec.cpu_threads:
        torch.set_num_threads(spec.cpu_threads)
    if spec.tiny:
        write_tiny_checkpoints(spec.paths.wan_dir.parent)


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
        _prepare(spec)
        loaded = load_models(spec.paths, spec.precision, spec.device, components=["t5", "clip", "wav2vec"])
        self.models = Models(t5=CachedPrompts(loaded.t5), clip=loaded.clip, wav2vec=loaded.wav2vec)

    @ray.method(num_returns=2)
    def encode(self, job: Job, settings: RenderSettings) -> tuple[dict, JobInputs]:
        """(a small summary for the scheduler, the inputs for the renderer)."""
        with local_copies(job) as local_job:
            inputs = encode_job(self.models, local_job, settings)
        return {"frames": inputs.num_frames, "windows": len(plan_for(inputs.num_frames, settings))}, inputs


@ray.remote
class Renderer:
    def __init__(self, spec: ModelSpec, run_root: str, name: str):
        _prepare(spec)
        self.name = name
        quant = None if spec.quant == "none" else spec.quant
        self.models = load_models(spec.paths, spec.precision, spec.device, ["dit", "vae"], dit_quant=quant)
        apply_attention(self.models.dit, spec.attention, spec.device)
        self.store = RunStore(run_root)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"talkfarm-{name}-"))

    def render(self, job: Job, inputs: JobInputs, settings: RenderSettings, attempt: int):
        """Render the job from its last stored window on; yields a progress event after every window
        (a streaming generator, so the driver sees progress while the job runs)."""
        stored = self.store.load_state(job.id)
        names = list(stored.segments) if stored else []
        state = stored or ResumeState()
        workdir = self.scratch / job.id
        started = time.time()
        for report in render_windows(self.models, job, inputs, settings, workdir, state):
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

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=1)
def finish(job: Job, inputs: JobInputs, output_name: str, run_root: str) -> dict:
    """Concatenate the stored segments, mux the original audio, verify, publish under `output_name`."""
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
