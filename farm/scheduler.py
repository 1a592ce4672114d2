"""The farm's scheduler: one loop over ray.wait that moves jobs through encode -> render -> finish.

- Encoders run ahead of the renderers (bounded by `max_in_flight`), so a GPU never waits on T5/wav2vec2.
- Renderers get jobs once they have loaded their models: on an autoscaling cluster they wait (as
  pending actors, whose resource demand makes the autoscaler add GPU nodes) and start work as GPUs
  arrive. When no job is left to start, idle renderers and those still waiting are let go, so the
  autoscaler can remove their nodes.
- A renderer renders one job at a time; the longest encoded job goes first, so the long tail of a
  manifest does not end with one GPU rendering its longest job alone. A renderer on its job's last
  window is given its next job then: it starts on the device as soon as that window is off it, while
  the renderer still encodes and stores the window (farm.actors.DeviceTurns), so the GPU does not
  wait on x264 at a job's end.
- Rendering is a streaming generator: one event per window, which drives the progress display. On a
  terminal the display also asks each busy renderer what its device does (`doing`: window, stage, step),
  once a second, without waiting for the answer.
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
from datetime import UTC, datetime

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from farm.actors import ActorSpec, Encoder, Renderer, finish
from farm.errors import WorkerError
from farm.manifest import ManifestRow
from farm.progress import Progress
from farm.storage import RunStore
from pipeline.job import RenderSettings

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10  # for idle renderers to remove their scratch folders when the run ends
ASK_EVERY_S = 1.0  # how often the progress line asks the renderers what their devices do


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
    attempts: int = 0  # failed attempts in this run (the retry budget counts these)
    earlier_attempts: int = 0  # from earlier runs of the command, for a row resumed here
    earlier_seconds: float = 0.0
    meta: dict | None = None  # from the encoder: frames, windows, encode_seconds
    inputs: object = None  # ObjectRef of the JobInputs
    started: float | None = None
    actor: str | None = None
    windows_done: int = 0

    @property
    def id(self) -> str:
        return self.row.job.id


class RendererGroup:
    """One renderer: one actor, or `size` actors packed on one node (STRICT_PACK placement) that meet
    through a file in that node's /tmp and split each forward (pipeline.parallel). Rank 0 stores and
    reports; the other ranks compute along."""

    def __init__(self, name: str, size: int, spec: ActorSpec, run_root: str, resources: dict):
        self.name, self.failures = name, 0  # failures: jobs failed in a row
        self.turns = 0  # jobs given to it so far: the next one's device turn
        self.loaded = False  # its models are loaded (rank 0's `ready` returned): it can take jobs
        options = {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0)}
        self.placement = None
        if size == 1:
            self.actors = [Renderer.options(name=name, **options).remote(spec, run_root, name)]
            return
        self.placement = placement_group([dict(resources)] * size, strategy="STRICT_PACK")
        rendezvous = f"file:///tmp/talkfarm-{uuid.uuid4().hex}"
        self.actors = [
            Renderer.options(
                name=name if rank == 0 else f"{name}-rank{rank}", **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
            ).remote(spec, run_root, name, rank, size, rendezvous)
            for rank in range(size)
        ]

    @property
    def size(self) -> int:
        return len(self.actors)

    def ready(self):
        """A ref that resolves once the group has loaded (rank 0 loads after every rank has joined)."""
        return self.actors[0].ready.remote()

    def render(self, task: Task) -> tuple[object, list]:
        """Start the task on every member: (rank 0's generator of window events, the others')."""
        attempt, turn = task.earlier_attempts + task.attempts + 1, self.turns
        self.turns += 1
        leader, *others = (actor.render.remote(task.row.job, task.inputs, task.settings, attempt, turn) for actor in self.actors)
        return leader, others

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.placement is not None:
            remove_placement_group(self.placement)


@dataclass
class Scheduler:
    """The state of a run between events; each `_on_*` method handles one kind of event."""

    spec: ActorSpec
    run_root: str
    resources: Resources
    progress: Progress
    on_result: Callable[[dict], None]  # called with each finished or failed row
    keep_windows: bool = False  # storage.keep_windows: a finished job's segments and resume state stay
    encoders: list = field(default_factory=list)
    groups: list[RendererGroup] = field(default_factory=list)  # every live renderer
    starting: dict = field(default_factory=dict)  # `ready` ref -> its group, loading or waiting for resources
    to_encode: deque = field(default_factory=deque)
    encoding: dict = field(default_factory=dict)  # meta ref -> (task, encoder slot)
    ready: list[Task] = field(default_factory=list)  # encoded, waiting for a renderer
    rendering: dict = field(default_factory=dict)  # rank 0's generator -> (task, its group); two at most per group
    followers: dict = field(default_factory=dict)  # the other ranks' generators -> (task, their group)
    finishing: dict = field(default_factory=dict)  # finish task ref -> task
    asking: dict = field(default_factory=dict)  # `doing` ref -> its group (the progress line's stages)
    _asked_at: float = 0.0
    _spawned: int = 0
    _load_deaths: int = 0  # renderers in a row that died while loading

    def start(self) -> None:
        self.encoders = [self._encoder() for _ in range(self.resources.encoders)]
        for size in self.resources.group_sizes:
            self._spawn(size)

    def stop(self) -> None:
        self._let_go(list(self.groups))
        for actor in self.encoders:
            ray.kill(actor, no_restart=True)
        self.encoders = []

    def _let_go(self, groups: list[RendererGroup]) -> None:
        """Kill `groups`, letting the idle ones remove their scratch folders first; a busy or dead one
        is killed as it is, and the next renderer to start on its machine removes what it left."""
        idle = self._idle()
        closing = [actor.close.remote() for group in groups if group in idle for actor in group.actors]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for group in groups:
            group.kill()
            self.groups.remove(group)
        self.starting = {ref: group for ref, group in self.starting.items() if group not in groups}

    def _encoder(self):
        return Encoder.options(**self.resources.encoder).remote(self.spec)

    def _spawn(self, size: int) -> RendererGroup:
        group = RendererGroup(f"renderer-{self._spawned}", size, self.spec, self.run_root, self.resources.renderer)
        self._spawned += 1
        self.groups.append(group)
        self.starting[group.ready()] = group
        return group

    def _replace(self, group: RendererGroup, reason: str) -> RendererGroup:
        """Kill `group` and start a new one of its size in its place. A job it still had (the next one,
        waiting for its turn) goes back to the queue as it is: its attempt was not its fault."""
        log.warning("replacing %s: %s", group.name, reason)
        group.kill()
        self.groups.remove(group)
        self.starting = {ref: g for ref, g in self.starting.items() if g is not group}
        self._drop_followers(group)
        for gen in [g for g, (_, owner) in self.rendering.items() if owner is group]:
            task, _ = self.rendering.pop(gen)
            self.ready.insert(0, task)
        return self._spawn(group.size)

    def _drop_followers(self, group: RendererGroup) -> None:
        for gen in [g for g, (_, owner) in self.followers.items() if owner is group]:
            self.followers.pop(gen)

    def _jobs(self, group: RendererGroup) -> list[Task]:
        return [task for task, owner in self.rendering.values() if owner is group]

    def _idle(self) -> list[RendererGroup]:
        return [group for group in self.groups if group.loaded and not self._jobs(group)]

    def _free_renderer(self) -> RendererGroup | None:
        """The renderer to give the next job: an idle one, else one whose only job is on its last window."""
        idle = self._idle()
        if idle:
            return idle[0]
        for group in self.groups:
            jobs = self._jobs(group)
            if len(jobs) == 1 and jobs[0].windows_done >= jobs[0].meta["windows"] - 1:
                return group
        return None

    # ------------------------------------------------------------------------------------------ the loop

    def run(self, rows: list[tuple[ManifestRow, RenderSettings]], earlier: dict[str, dict],
            expected: dict[str, int | None] | None = None) -> None:
        """Render `rows`; `earlier` holds the results rows of earlier runs by id, whose attempts and
        seconds a resumed row adds to its own; `expected`, each row's windows as far as the manifest tells
        (None, or a row missing: not known before its encode), for the progress line's total."""
        for row, settings in rows:
            before = earlier.get(row.job.id, {})
            self.to_encode.append(Task(row, settings, earlier_attempts=before.get("attempts") or 0,
                                       earlier_seconds=before.get("seconds") or 0.0))
        self.progress.start({row.job.id: (expected or {}).get(row.job.id) for row, _ in rows})
        while self.to_encode or self.encoding or self.ready or self.rendering or self.followers or self.finishing:
            self._dispatch()
            if self.progress.live:
                self._ask_what_renderers_do()
            waiting = [*self.starting, *self.encoding, *self.rendering, *self.followers, *self.finishing]
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self.starting:
                    self._on_loaded(ref)
                elif ref in self.encoding:
                    self._on_encoded(ref)
                elif ref in self.followers:
                    self._on_follower(ref)
                elif ref in self.rendering:
                    self._on_window(ref)
                else:
                    self._on_finished(ref)

    def _dispatch(self) -> None:
        """Encode ahead (up to max_in_flight jobs encoded or encoding) and give free renderers the
        longest encoded jobs."""
        while self.to_encode and len(self.encoding) + len(self.ready) < self.resources.max_in_flight:
            task = self.to_encode.popleft()
            slot = len(self.encoding) % len(self.encoders)
            meta, task.inputs = self.encoders[slot].encode.remote(task.row.job, task.settings)
            self.encoding[meta] = (task, slot)
        self.ready.sort(key=lambda t: -t.meta["frames"])
        while self.ready and (group := self._free_renderer()) is not None:
            task = self.ready.pop(0)
            task.actor, task.started = group.name, task.started or time.time()
            leader, others = group.render(task)
            self.rendering[leader] = (task, group)
            self.followers |= {gen: (task, group) for gen in others}
        if not (self.to_encode or self.encoding or self.ready):  # no job left to start
            followed = {group for _, group in self.followers.values()}
            spare = [g for g in self.groups if not self._jobs(g) and g not in followed]
            if spare:
                log.info("no job left to start: letting %s go", ", ".join(g.name for g in spare))
                self._let_go(spare)

    def _ask_what_renderers_do(self) -> None:
        """For the progress line on a terminal: each rendering renderer's device stage, asked at most once a
        second, answers taken as they come without waiting."""
        if self.asking:
            answered, _ = ray.wait(list(self.asking), num_returns=len(self.asking), timeout=0)
            for ref in answered:
                group = self.asking.pop(ref)
                try:
                    activity = ray.get(ref)
                except Exception:  # noqa: BLE001 - a renderer that died: its render call tells the scheduler
                    activity = None
                rendering = {task.id for task in self._jobs(group)}
                self.progress.doing(group.name, activity if activity and activity.job in rendering else None)
        if not self.asking and time.monotonic() - self._asked_at >= ASK_EVERY_S:
            self._asked_at = time.monotonic()
            busy = {group.name: group for _, group in self.rendering.values()}
            self.asking = {group.actors[0].doing.remote(): group for group in busy.values()}
            for name in list(self.progress.activities):
                if name not in busy:
                    self.progress.doing(name, None)

    def _on_loaded(self, ref) -> None:
        """A renderer loaded its models (it can take jobs now), or could not."""
        group = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError:  # it died loading (its node went away, out of memory): start another
            self._load_deaths += 1
            if self._load_deaths > self.resources.actor_failure_limit:
                raise RunStopped(f"{self._load_deaths} renderers in a row died while loading their models") from None
            self._replace(group, "it died while loading its models")
            return
        except Exception as error:  # noqa: BLE001
            raise _could_not_load(group.name, _cause(error)) from None
        self._load_deaths = 0
        group.loaded = True

    def _on_encoded(self, ref) -> None:
        task, slot = self.encoding.pop(ref)
        try:
            task.meta = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - every failure becomes the row's reason
            context = ""
            if isinstance(error, RayActorError):
                log.warning("replacing encoder %d: it died while encoding %s", slot, task.id)
                self.encoders[slot] = self._encoder()
                context = f"encoder {slot} died"
            task.inputs = None
            self._fail_or_retry(task, error, context, worker=f"encoder {slot}")
            return
        self.progress.planned(task.id, task.meta["windows"])
        self.ready.append(task)

    def _on_window(self, ref) -> None:
        """Rank 0 of a renderer finished a window, or its job, or failed."""
        task, group = self.rendering[ref]
        try:
            event = ray.get(next(ref))
        except StopIteration:
            self.rendering.pop(ref)
            group.failures = 0
            self.finishing[finish.remote(task.row.job, task.inputs, task.row.output, self.run_root, self.keep_windows)] = task
            self.progress.finishing(task.id)
            return
        except RayActorError as error:
            self.rendering.pop(ref)
            self._replace(group, f"it died while rendering {task.id}")
            self._fail_or_retry(task, error, f"{group.name} died after window {task.windows_done}")
            return
        except Exception as error:  # noqa: BLE001
            self.rendering.pop(ref)
            group.failures += 1
            if group.failures >= self.resources.actor_failure_limit or group.size > 1:
                # a group's other members may be stuck in a collective: replace it whole
                self._replace(group, f"{group.failures} jobs failed in a row")
            self._fail_or_retry(task, error, worker=group.name)
            return
        task.windows_done = event["window"]
        self.progress.window(task.id, event["window"], event["windows"])

    def _on_follower(self, ref) -> None:
        """A rank > 0 of a group ended its job (they yield nothing), or failed: the whole group goes,
        whether its leader is still rendering the job or has finished it."""
        task, group = self.followers.pop(ref)
        try:
            ray.get(next(ref))
            return  # not reached: followers yield no events
        except StopIteration:
            return
        except Exception as error:  # noqa: BLE001
            leader = next((gen for gen, (t, _) in self.rendering.items() if t is task), None)
            if leader is not None:
                self.rendering.pop(leader)
            self._replace(group, "a member of its group died")
            if leader is not None:
                self._fail_or_retry(task, error, f"{group.name} lost a group member after window {task.windows_done}",
                                    group.name)

    def _on_finished(self, ref) -> None:
        task = self.finishing.pop(ref)
        try:
            result = ray.get(ref)
        except Exception as error:  # noqa: BLE001
            self._fail_or_retry(task, error)
            return
        self.progress.job_done(task.id)
        self.on_result(self._row(task, "done", True, **result))

    def _fail_or_retry(self, task: Task, error: BaseException, context: str = "", worker: str = "a worker") -> None:
        """Fail the row (with a one-line reason) or queue it again, as the error allows."""
        cause = _cause(error)
        task.attempts += 1
        if isinstance(cause, WorkerError):
            if cause.startup:
                raise _could_not_load(worker, cause)
            log.error("job %s, attempt %d:\n%s", task.id, task.attempts, cause.traceback_text.rstrip())
        retryable = cause.retryable if isinstance(cause, WorkerError) else True  # Ray's own: a lost actor or object
        if not retryable or task.attempts > self.resources.max_retries:
            reason = cause.reason if isinstance(cause, WorkerError) else _first_line(cause)
            reason = f"{context}: {reason}" if context else reason
            self.progress.job_failed(task.id, reason)
            self.on_result(self._row(task, "failed", False, error=reason, retryable=retryable))
        else:
            log.warning("job %s: attempt %d failed (%s); retrying", task.id, task.attempts, type(cause).__name__)
            self.to_encode.appendleft(task) if task.inputs is None else self.ready.insert(0, task)

    def interrupted(self) -> list[dict]:
        """Rows for the jobs that had started and not ended when the run was stopped, with the window a
        re-run starts them at (from the store: the renderer may have stored windows not yet reported)."""
        running = [task for task, _ in self.rendering.values()] + list(self.finishing.values())
        waiting = [*self.ready, *self.to_encode, *(task for task, _ in self.encoding.values())]
        store = RunStore(self.run_root)
        rows = []
        for task, attempt_running in [(t, True) for t in running] + [(t, False) for t in waiting if t.started]:
            rows.append(self._row(task, "interrupted", attempt_running, next_window=store.next_window(task.id)))
        return rows

    def _row(self, task: Task, status: str, attempt_running: bool, **fields) -> dict:
        """The task's results row: what the scheduler knows, then `fields` (the finish task's columns, or
        the error), with the attempts and seconds of earlier runs added in. attempt_running: the attempt
        under way counts too (a failed one is already counted)."""
        meta = task.meta or {}
        seconds = time.time() - task.started if task.started else 0.0
        return {
            "id": task.id, "status": status, "frames": meta.get("frames"), "windows": meta.get("windows"),
            "encode_seconds": meta.get("encode_seconds"), "actor": task.actor,
            "attempts": task.earlier_attempts + task.attempts + attempt_running,
            "seconds": (task.earlier_seconds + seconds) or None, "finished": datetime.now(UTC), **fields,
        }


def _cause(error: BaseException) -> BaseException:
    """The worker's own exception, out of Ray's wrapper."""
    return error.cause if isinstance(error, RayTaskError) else error


def _could_not_load(worker: str, cause: BaseException) -> RunStopped:
    reason = cause.reason if isinstance(cause, WorkerError) else _first_line(cause)
    return RunStopped(f"{worker} could not load its models: {reason}")


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
