"""The Ray workers: encoders (T5, CLIP, wav2vec2), renderers (DiT + VAE, one per GPU) and the
finishing task (mux, verify, publish). Actors load their models once in __init__ and then work job
after job; everything a job produces is written through the RunStore as it is produced.
"""

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from farm.errors import Loaded, as_worker_error
from farm.localize import local_copies
from farm.storage import RunStore
from farm.timings import job_timings
from pipeline.assemble import ModelSpec, build_renderer
from pipeline.job import FPS, Job, RenderSettings, ResumeState
from pipeline.models.checkpoints import CheckpointPaths, Models, load_models
from pipeline.models.tiny import write_tiny_checkpoints
from pipeline.render import (
    JobInputs,
    encode_job,
    finish_job,
    plan_for,
    render_windows,
)

log = logging.getLogger(__name__)

# A group member that stops answering (its peer died) gives up after this long; the driver replaces
# the whole group as soon as it sees a member die, so this only bounds a hang.
GROUP_TIMEOUT = timedelta(minutes=5)
SCRATCH_PREFIX = "talkfarm-renderer-"  # + the renderer process's pid, under the system temp folder
ACTOR_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the level: farm.runlog reads it


@dataclass(frozen=True)
class Activity:
    """What a renderer's device is doing: `stage` (pipeline.timing's names) of window `window` of `windows`
    of job `job`; `count` is the step number of a "dit" stage, of `steps`."""

    job: str
    window: int
    windows: int
    stage: str
    count: int
    steps: int


@dataclass(frozen=True)
class ActorSpec:
    """What every actor needs to load its models: plain data, sent from the driver."""

    paths: CheckpointPaths
    model: ModelSpec
    device: str  # "cuda" or "cpu"
    cpu_threads: int | None = None  # torch threads per actor, where torch works on the CPU (Ray would give one)
    tiny: bool = False  # the tiny set is written where the actor runs (pods do not share the driver's disk)


def _prepare(spec: ActorSpec) -> None:
    logging.basicConfig(level=logging.INFO, format=ACTOR_LOG_FORMAT)
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


def _end_on_sigterm() -> None:
    """SIGTERM (a node shutting down, a pod evicted) ends this actor's process at once, as SIGKILL would, and
    its job resumes elsewhere from its last stored window. Ray's own handler raises SystemExit in the main
    thread, which waits in Ray's task loop while the actor's tasks run on other threads: the process would
    go on until its task, a whole job, ended. Called in __init__, which Ray runs on the main thread."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@ray.remote
class Encoder:
    def __init__(self, spec: ActorSpec):
        _end_on_sigterm()
        self.models = Loaded(lambda: _load_encoders(spec))

    @ray.method(num_returns=2)
    def encode(self, job: Job, settings: RenderSettings) -> tuple[dict, JobInputs]:
        """(a small summary for the scheduler, the inputs for the renderer)."""
        models = self.models.get()
        started = time.perf_counter()
        with as_worker_error(), local_copies(job) as local_job:
            inputs = encode_job(models, local_job, settings)
        meta = {"frames": inputs.num_frames, "windows": len(plan_for(inputs.num_frames, settings)),
                "encode_seconds": time.perf_counter() - started}
        return meta, inputs


def _load_encoders(spec: ActorSpec) -> Models:
    _prepare(spec)
    device = spec.model.memory.encoder_device or spec.device
    loaded = load_models(spec.paths, spec.model.precision, device, components=["t5", "clip", "wav2vec"])
    return Models(t5=CachedPrompts(loaded.t5), clip=loaded.clip, wav2vec=loaded.wav2vec)


class DeviceTurns:
    """The order in which a renderer's jobs use its device: job `turn` (0, 1, 2, ... as the scheduler
    numbered them) waits until every earlier one is off the device. A renderer takes its next job while
    it still encodes and stores the last window of the current one (pipeline.render's device_lock), and
    the members of a sequence-parallel group must run their jobs in the same order, whichever of their
    two calls Ray starts first."""

    def __init__(self):
        self._next = 0  # the turn whose job may use the device now
        self._changed = threading.Condition()

    def wait(self, turn: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._next >= turn)

    def done(self, turn: int) -> None:
        """Turn `turn` is over: its job left the device, or ended before it used it (called again, nothing)."""
        with self._changed:
            self._next = max(self._next, turn + 1)
            self._changed.notify_all()

    def hold(self, turn: int) -> "DeviceHold":
        return DeviceHold(self, turn)


class DeviceHold:
    """The device for turn `turn`, as a context manager; `began` is the wall time it was taken."""

    def __init__(self, turns: DeviceTurns, turn: int):
        self.turns, self.turn, self.began = turns, turn, None

    def __enter__(self) -> "DeviceHold":
        self.turns.wait(self.turn)
        self.began = time.time()
        return self

    def __exit__(self, *exc) -> None:
        self.turns.done(self.turn)


# Two calls at a time: the next job's, which waits for its device turn, beside the current job's end;
# `doing` in a group of its own, so that it answers while both are busy.
@ray.remote(max_concurrency=2, concurrency_groups={"status": 1})
class Renderer:
    """One GPU's renderer, or one member (`rank` of `world`) of a sequence-parallel group: the group's
    members run the same window loop in lockstep (pipeline.parallel), rank 0 stores and reports."""

    def __init__(self, spec: ActorSpec, run_root: str, name: str, rank: int = 0, world: int = 1, rendezvous: str = ""):
        _end_on_sigterm()
        self.name, self.rank, self.world = name, rank, world
        self.models = Loaded(lambda: _load_renderer(spec, rank, world, rendezvous))
        self.store = RunStore(run_root)
        self.scratch = renderer_scratch()
        self.turns = DeviceTurns()
        self.activity: Activity | None = None  # the device's latest stage (of a job that may have ended since)

    @ray.method(concurrency_group="status")
    def doing(self) -> "Activity | None":
        return self.activity

    def ready(self) -> str:
        """Returns once the models are loaded: the driver gives a renderer jobs only then (on an autoscaling
        cluster it may wait minutes for a GPU). Raises the load's error, as a startup WorkerError."""
        self.models.get()
        return self.name

    def close(self) -> None:
        """Remove the scratch folder; the driver calls it before it kills the renderer (at the run's end,
        or when no job is left for it)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def render(self, job: Job, inputs: JobInputs, settings: RenderSettings, attempt: int, turn: int):
        """Render the job from its last stored window on, once device turn `turn` comes (DeviceTurns);
        yields a progress event after every window (a streaming generator, so the driver sees progress
        while the job runs). Ranks > 0 of a group compute along and yield nothing."""
        device = self.turns.hold(turn)
        try:
            yield from self._render(job, inputs, settings, attempt, device)
        finally:
            self.turns.done(turn)  # also when the job failed before it took the device

    def _render(self, job: Job, inputs: JobInputs, settings: RenderSettings, attempt: int, device: DeviceHold):
        models = self.models.get()
        with as_worker_error():
            stored = self.store.load_state(job.id)
            names = list(stored.segments) if stored else []
            state = stored or ResumeState()
            workdir = self.scratch / job.id  # removed after the job, however it ends
            started = None  # the first window's time runs from when the job took the device

            def on_stage(window, windows: int, stage: str, count: int) -> None:
                self.activity = Activity(job.id, window.index + 1, windows, stage, count, settings.steps)

            try:
                # closing: a failure here stops the device's thread (pipeline.ahead) before the next job
                with closing(render_windows(models, job, inputs, settings, workdir, state, device_lock=device,
                                            on_stage=on_stage)) as reports:
                    for report in reports:  # each comes as the device renders the next window
                        started = started or device.began
                        if self.rank > 0:
                            Path(report.state.segments[-1]).unlink()
                            continue
                        stored_from = time.perf_counter()
                        names.append(self.store.put_segment(job.id, report.state.segments[-1]))
                        self.store.save_state(job.id, report.state, names)
                        finished = time.time()
                        self.store.append_window_log(job.id, {
                            "window": report.window.index, "attempt": attempt, "actor": self.name,
                            "host": socket.gethostname(), "devices": self.world, "started": started,
                            "finished": finished, "seconds": finished - started,
                            "stages": report.stages | {"store": time.perf_counter() - stored_from},
                            "steps": list(report.steps), **report.memory,
                        })
                        Path(report.state.segments[-1]).unlink()
                        started = finished
                        yield {"job": job.id, "window": report.window.index + 1, "windows": report.windows,
                               "actor": self.name}
            finally:
                shutil.rmtree(workdir, ignore_errors=True)


def renderer_scratch() -> Path:
    """This renderer process's scratch folder (SCRATCH_PREFIX + pid), made empty; the folders of renderer
    processes that are gone (killed, as ray.kill does, with no chance to clean up) are removed first."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name.removeprefix(SCRATCH_PREFIX)
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    scratch = root / f"{SCRATCH_PREFIX}{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    return scratch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _load_renderer(spec: ActorSpec, rank: int, world: int, rendezvous: str) -> Models:
    _prepare(spec)
    group = None
    if world > 1:
        backend = "nccl" if spec.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
        group = dist.group.WORLD
    return build_renderer(spec.paths, spec.model, spec.device, group)


@ray.remote(num_cpus=1)
def finish(job: Job, inputs: JobInputs, output_name: str, run_root: str, keep_windows: bool) -> dict:
    """Concatenate the stored segments, mux the original audio, verify, publish under `output_name`; then
    remove the segments and resume state unless `keep_windows` (storage.keep_windows)."""
    with as_worker_error():
        return _finish(job, inputs, output_name, run_root, keep_windows)


def _finish(job: Job, inputs: JobInputs, output_name: str, run_root: str, keep_windows: bool) -> dict:
    """The finished row's columns: where the output is, its length, and the job's timings."""
    started = time.perf_counter()
    store = RunStore(run_root)
    state = store.load_state(job.id)
    with tempfile.TemporaryDirectory(prefix="talkfarm-finish-") as tmp, local_copies(job) as local_job:
        tmp = Path(tmp)
        segments = store.fetch_segments(job.id, state.segments, tmp)
        local = finish_job(local_job, ResumeState(state.next_window, None, [str(s) for s in segments]), inputs, tmp / "out.mp4", tmp)
        url = store.publish_output(local, output_name)
    if not keep_windows:
        store.clear_windows(job.id)
    duration = inputs.num_frames / FPS
    return {"output": url, "frames": inputs.num_frames, "duration": duration,
            **job_timings(store.read_window_log(job.id), duration), "finish_seconds": time.perf_counter() - started}
