"""The farm's scheduler: one loop over ray.wait that moves jobs through encode -> render -> finish.

- Encoders run ahead of the renderers (bounded by `max_in_flight`), so a GPU never waits on T5/wav2vec2.
- A renderer takes one job at a time; the longest encoded job goes first, so the long tail of a
  manifest does not end with one GPU rendering its longest job alone.
- Rendering is a streaming generator: one event per window, which drives the progress display.
- A renderer that dies (ray.kill, OOM, lost node) is replaced; its job goes back to the queue and
  resumes from its last stored window on whichever renderer is free. Each job has a retry budget, spent
  only on failures a retry can get past (a lost actor, I/O, out of memory: farm/errors.py); any other
  error (a file ffmpeg cannot read, a bad box, a bug) fails the row at once, its traceback logged once.
  A renderer whose jobs keep failing is replaced after `actor_failure_limit` failures in a row.
- A worker that cannot load its models (a bad checkpoint, a missing kernel) stops the run: every job
  would fail the same way. The rows not finished stay as they are, for a re-run.

The scheduler's memory is a cache: everything a job needs to resume is in the RunStore.
"""

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from farm.actors import Encoder, ModelSpec, Renderer, finish
from farm.errors import WorkerError
from farm.manifest import ManifestRow
from farm.progress import Progress
from pipeline.job import RenderSettings

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """A worker could not start; the message says which and why, in one line."""


@dataclass
class Resources:
    """Ray resources per worker kind (GPUs on a GPU cluster, CPUs otherwise)."""

    renderer: dict  # Ray resources of one renderer actor (a member of a group): {"CPU": 1[, "GPU": 1]}
    encoder: dict
    group_sizes: list[int]  # one renderer per entry, of that many GPUs (1: a plain renderer)
    encoders: int
    max_in_flight: int
    max_retries: int
    actor_failure_limit: int


@dataclass
class Task:
    row: ManifestRow
    settings: RenderSettings
    attempts: int = 0
    meta: dict | None = None  # from the encoder: frames, windows
    inputs: object = None  # ObjectRef of the JobInputs
    started: float | None = None
    actor: str | None = None
    windows_done: int = 0

    @property
    def id(self) -> str:
        return self.row.job.id


@dataclass
class Scheduler:
    spec: ModelSpec
    run_root: str
    resources: Resources
    progress: Progress
    on_result: Callable[[dict], None]  # called with each finished or failed row
    encoders: list = field(default_factory=list)
    renderers: dict = field(default_factory=dict)  # name -> the actors of the renderer, rank 0 first
    placement: dict = field(default_factory=dict)  # name -> placement group (renderers of several GPUs)
    failures: dict = field(default_factory=dict)  # renderer name -> consecutive failures
    _spawned: int = 0

    def start(self) -> None:
        self.encoders = [Encoder.options(**self.resources.encoder).remote(self.spec) for _ in range(self.resources.encoders)]
        for size in self.resources.group_sizes:
            self._spawn_renderer(size)

    def stop(self) -> None:
        for name in list(self.renderers):
            self._kill(name)
        for actor in self.encoders:
            ray.kill(actor, no_restart=True)
        self.encoders = []

    def _spawn_renderer(self, size: int) -> str:
        """A renderer of `size` GPUs: one actor, or a group packed on one node (STRICT_PACK) that meets
        through a file in that node's /tmp and splits each forward (pipeline.parallel)."""
        name = f"renderer-{self._spawned}"
        self._spawned += 1
        if size == 1:
            self.renderers[name] = [Renderer.options(name=name, **self._renderer_options()).remote(self.spec, self.run_root, name)]
        else:
            group = placement_group([dict(self.resources.renderer)] * size, strategy="STRICT_PACK")
            rendezvous = f"file:///tmp/talkfarm-{uuid.uuid4().hex}"
            self.placement[name] = group
            self.renderers[name] = [
                Renderer.options(
                    name=name if rank == 0 else f"{name}-rank{rank}", **self._renderer_options(),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
                ).remote(self.spec, self.run_root, name, rank, size, rendezvous)
                for rank in range(size)
            ]
        self.failures[name] = 0
        return name

    def _renderer_options(self) -> dict:
        return {"num_cpus": self.resources.renderer["CPU"], "num_gpus": self.resources.renderer.get("GPU", 0)}

    def _kill(self, name: str) -> None:
        for actor in self.renderers.pop(name):
            ray.kill(actor, no_restart=True)
        if name in self.placement:
            remove_placement_group(self.placement.pop(name))
        self.failures.pop(name, None)

    def _replace(self, name: str, reason: str) -> str:
        log.warning("replacing %s: %s", name, reason)
        size = len(self.renderers[name])
        self._kill(name)
        return self._spawn_renderer(size)

    def run(self, rows: list[tuple[ManifestRow, RenderSettings]]) -> None:
        to_encode = deque(Task(row, settings) for row, settings in rows)
        encoding: dict = {}  # meta ref -> (task, encoder slot)
        ready: list[Task] = []  # encoded, waiting for a renderer, longest first
        rendering: dict = {}  # rank 0's generator -> (task, renderer name)
        followers: dict = {}  # the other ranks' generators of a group -> renderer name
        finishing: dict = {}  # ref -> task
        idle = list(self.renderers)
        self.progress.start(len(rows))

        def fail_or_retry(task: Task, error: BaseException, context: str = "", worker: str = "a worker") -> None:
            cause = error.cause if isinstance(error, RayTaskError) else error
            task.attempts += 1
            if isinstance(cause, WorkerError):
                if cause.startup:
                    raise RunStopped(f"{worker} could not load its models: {cause.reason}")
                log.error("job %s, attempt %d:\n%s", task.id, task.attempts, cause.traceback_text.rstrip())
            retryable = cause.retryable if isinstance(cause, WorkerError) else True  # Ray's own: a lost actor or object
            if not retryable or task.attempts > self.resources.max_retries:
                reason = cause.reason if isinstance(cause, WorkerError) else _first_line(cause)
                reason = f"{context}: {reason}" if context else reason
                self.progress.job_failed(task.id, reason)
                self.on_result(self._row(task, "failed", error=reason))
            else:
                log.warning("job %s: attempt %d failed (%s); retrying", task.id, task.attempts, type(cause).__name__)
                to_encode.appendleft(task) if task.inputs is None else ready.insert(0, task)

        while to_encode or encoding or ready or rendering or followers or finishing:
            while to_encode and len(encoding) + len(ready) < self.resources.max_in_flight:
                task = to_encode.popleft()
                slot = len(encoding) % len(self.encoders)
                meta, task.inputs = self.encoders[slot].encode.remote(task.row.job, task.settings)
                encoding[meta] = (task, slot)
            ready.sort(key=lambda t: -t.meta["frames"])
            while idle and ready:
                task, name = ready.pop(0), idle.pop(0)
                task.actor, task.started = name, task.started or time.time()
                leader, *others = (
                    member.render.remote(task.row.job, task.inputs, task.settings, task.attempts + 1)
                    for member in self.renderers[name]
                )
                rendering[leader] = (task, name)
                followers |= {gen: name for gen in others}

            def drop_followers(name: str) -> None:
                for gen in [g for g, n in followers.items() if n == name]:
                    followers.pop(gen)

            done, _ = ray.wait([*encoding, *rendering, *followers, *finishing], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in encoding:
                    task, slot = encoding.pop(ref)
                    try:
                        task.meta = ray.get(ref)
                        ready.append(task)
                    except Exception as error:  # noqa: BLE001 - every failure becomes the row's reason
                        context = ""
                        if isinstance(error, RayActorError):
                            log.warning("replacing encoder %d: it died while encoding %s", slot, task.id)
                            self.encoders[slot] = Encoder.options(**self.resources.encoder).remote(self.spec)
                            context = f"encoder {slot} died"
                        task.inputs = None
                        fail_or_retry(task, error, context, worker=f"encoder {slot}")
                elif ref in followers:
                    name = followers.pop(ref)
                    try:
                        ray.get(next(ref))  # followers yield nothing: StopIteration once their job is done
                    except StopIteration:
                        continue
                    except Exception as error:  # noqa: BLE001 - a member died: the whole group goes
                        leader = next((g for g, (_, n) in rendering.items() if n == name), None)
                        drop_followers(name)
                        idle.append(self._replace(name, "a member of its group died"))
                        if leader is not None:
                            task, _ = rendering.pop(leader)
                            fail_or_retry(task, error, f"{name} lost a group member after window {task.windows_done}", name)
                elif ref in rendering:
                    task, name = rendering[ref]
                    try:
                        event = ray.get(next(ref))
                        task.windows_done = event["window"]
                        self.progress.window(task.id, event["window"], event["windows"])
                        continue
                    except StopIteration:
                        rendering.pop(ref)
                        self.failures[name] = 0
                        idle.append(name)
                        finishing[finish.remote(task.row.job, task.inputs, task.row.output, self.run_root)] = task
                    except RayActorError as error:
                        rendering.pop(ref)
                        drop_followers(name)
                        idle.append(self._replace(name, f"it died while rendering {task.id}"))
                        fail_or_retry(task, error, f"{name} died after window {task.windows_done}")
                    except Exception as error:  # noqa: BLE001
                        rendering.pop(ref)
                        drop_followers(name)
                        self.failures[name] += 1
                        if self.failures[name] >= self.resources.actor_failure_limit or len(self.renderers[name]) > 1:
                            # a group's other members may be stuck in a collective: replace it whole
                            name = self._replace(name, f"{self.failures[name]} jobs failed in a row")
                        idle.append(name)
                        fail_or_retry(task, error, worker=name)
                else:
                    task = finishing.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as error:  # noqa: BLE001
                        fail_or_retry(task, error)
                        continue
                    self.progress.job_done(task.id)
                    self.on_result(self._row(task, "done", **result))

    def _row(self, task: Task, status: str, **fields) -> dict:
        meta = task.meta or {}
        return {
            "id": task.id, "status": status, "error": fields.get("error"), "output": fields.get("output"),
            "frames": fields.get("frames", meta.get("frames")), "duration": fields.get("duration"),
            "windows": meta.get("windows"), "seconds": time.time() - task.started if task.started else None,
            "actor": task.actor, "attempts": task.attempts + (status == "done"),
        }


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
