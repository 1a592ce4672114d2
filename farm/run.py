"""A run: the validated config -> rows to render -> Ray workers -> results.parquet and outputs.

Re-running the same command skips rows whose output is finished and published, and resumes the rest
at their last stored window, while each row's fingerprint (farm/fingerprint.py) is what they were made from.
"""

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import ray
import torch
from omegaconf import DictConfig, OmegaConf

from farm.actors import ActorSpec
from farm.config import ConfigError, TinyModel, checkpoint_paths, model_spec
from farm.driver_lease import hold_run_root
from farm.dryrun import dry_run
from farm.plan import AGAIN, DONE, FAILED_FOR_GOOD, RunPlan, expected_windows, plan_run, refused_by_checks
from farm.progress import Progress
from farm.runlog import run_log, take_actor_output
from farm.scheduler import Resources, RunStopped, Scheduler

log = logging.getLogger("talkfarm")

CPU_RENDERERS = 1  # on a machine without GPUs (the tiny model, the demo): a second one only splits the same cores
# Of Ray's GPU unit, what an encoder on the GPU asks for; each renderer leaves that much free, so the
# encoders fit beside the renderers (one per GPU) and count against the GPUs Ray hands out. Their models
# take ~14 GB of GPU memory at 14B (benchmarks/RESULTS.md), which Ray does not account for.
ENCODER_GPU_SHARE = 0.1
# A finished row writes only its own results file; results.parquet is rewritten whole (the rows' files
# compacted into it) at most this often, at the start and at the end: at 10,000 rows a whole write is
# ~100 ms and, on S3, a PUT, a copy and a delete.
COMPACT_EVERY_S = 30


@contextlib.contextmanager
def _sigterm_stops_the_run() -> Iterator[threading.Event]:
    """SIGTERM (what `ray job stop`, Kubernetes and batch systems send before they kill) stops the run as
    Ctrl-C does: every finished window is already stored, the interrupted rows are recorded and the actors
    ended. The handler raises KeyboardInterrupt in the main thread and sets the Event it yields (Ray turns
    any exception raised inside its calls into a plain KeyboardInterrupt, so the Event is what tells the two
    apart); a second SIGTERM while the run stops is ignored, the sender's SIGKILL being the hard stop. The
    handler before it comes back after. A run in another thread (a notebook, a test) keeps its process's
    handler: only the main thread may set one."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: DictConfig) -> int:
    """Render every row; returns the process exit code: 0 when every row is done or failed for a reason a
    retry cannot fix (a bad input, an error the same inputs repeat: the summary says how many), 1 when a
    row failed for a reason a retry might get past (retries used up) or the run stopped (a worker could
    not load its models), 130 after Ctrl-C, 143 after SIGTERM. A manifest that cannot be read, a run root
    made with other settings, or one that another live driver holds (farm/driver_lease.py) raises
    ConfigError. dry_run=true: farm.dryrun's plan instead, and nothing is written."""
    if cfg.dry_run:
        return dry_run(cfg)
    plan = plan_run(cfg)
    with hold_run_root(plan.store, on_lost=_stop_on_lost_lease()):  # before anything is written there
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["storage"]["root"] = plan.store.url  # where the run went, also when it was left to run_root
        stamp = plan.store.save_config(OmegaConf.to_yaml(resolved))
        progress = Progress(verbose=cfg.verbose)
        with run_log(plan.store, stamp, progress.handler()) as log_url:
            code = _render(cfg, plan, progress)
            log.info("the run's log: %s", log_url)
    return code


def _stop_on_lost_lease():
    """What to do when another driver has taken this run root over: stop as on SIGTERM where the run has
    the process's main thread; a run on another thread (a notebook, a test) has only the lease's log line."""
    if threading.current_thread() is threading.main_thread():
        return lambda: signal.raise_signal(signal.SIGTERM)
    return lambda: None


def _render(cfg, plan: RunPlan, progress: Progress) -> int:
    """run's work once its config is saved: the rows rendered, the results written, the summary printed."""
    rows, errors, store, results, prints, actions = plan.rows, plan.errors, plan.store, plan.results, plan.prints, plan.actions
    stamps = {job: json.dumps(parts) for job, parts in prints.items()}  # results.parquet's fingerprint column
    for row in rows:
        if actions[row.job.id].startswith(AGAIN):  # what its stored windows and output were made from changed
            log.info("%s: %s: rendering it again", row.job.id, actions[row.job.id].removeprefix(AGAIN))
            store.clear_job(row.job.id)  # the old output stays published until the new one replaces it
            del results[row.job.id]
        elif row.job.id in results and refused_by_checks(results[row.job.id]):
            del results[row.job.id]  # it passes the checks now: pending, no longer the old reason
        results.setdefault(row.job.id, {"id": row.job.id, "status": "pending"})["fingerprint"] = stamps[row.job.id]

    # The keys of this run's rows in results, in manifest order (an earlier run's other rows may be there
    # too); a row without an id, or sharing one with another row, is named by its row number.
    repeated = Counter([row.job.id for row in rows] + [error.id for error in errors])
    keyed = [(row.row, row.job.id) for row in rows]
    for error in errors:
        key = error.id if error.id is not None and repeated[error.id] == 1 else f"{error.id or ''} (row {error.row})".lstrip()
        results[key] = {"id": key, "status": "failed", "error": error.reason, "finished": datetime.now(UTC)}
        keyed.append((error.row, key))
        log.error("%s: %s", key, error.reason)
    ours = [key for _, key in sorted(keyed)]

    compacted_at = time.monotonic()  # when results.parquet was last written whole

    def save() -> None:
        nonlocal compacted_at
        mine = set(ours)
        store.write_results([results[key] for key in ours] + [r for key, r in results.items() if key not in mine])
        compacted_at = time.monotonic()

    finished = [row for row in rows if actions[row.job.id] == DONE]
    failed_for_good = [row for row in rows if actions[row.job.id] == FAILED_FOR_GOOD]
    todo = [(row, plan.row_settings(row)) for row in rows if not actions[row.job.id].startswith("skip")]
    if finished:
        log.info("%d of %d rows already finished: skipped", len(finished), len(ours))
    if failed_for_good:
        log.info("%d rows failed for good in an earlier run: skipped (retry_failed=true renders them again)",
                 len(failed_for_good))
    save()

    def record(row: dict) -> None:
        """A row ended: its own small file at once, the whole table every COMPACT_EVERY_S."""
        results[row["id"]] = {**row, "fingerprint": stamps[row["id"]]}
        store.put_result(results[row["id"]])
        if time.monotonic() - compacted_at >= COMPACT_EVERY_S:
            save()

    if todo:
        started_ray = not ray.is_initialized()  # a caller (a notebook, a test) may have started Ray already
        if started_ray:
            _start_ray(cfg)
        try:
            gpus = _gpus()
            spec = _actor_spec(cfg, gpus)
            scheduler = Scheduler(spec, store.url, _resources(cfg, gpus, spec.device), progress, record,
                                  keep_windows=cfg.storage.keep_windows)
        except ConfigError:
            if started_ray:
                ray.shutdown()
            raise
        # Ray's init set its own SIGTERM handler (sys.exit), so ours comes after it.
        with _sigterm_stops_the_run() as sigterm:
            try:
                scheduler.start()
                scheduler.run(todo, earlier=dict(results), expected={row.job.id: _count(expected_windows(row, s)) for row, s in todo})
            except KeyboardInterrupt:
                progress.close()
                results |= {row["id"]: {**row, "fingerprint": stamps[row["id"]]} for row in scheduler.interrupted()}
                save()
                terminated = sigterm.is_set()
                log.warning("%s: every finished window is stored; run the same command again to resume",
                            "stopped by SIGTERM" if terminated else "interrupted")
                return 143 if terminated else 130
            except RunStopped as stopped:
                progress.close()
                save()
                log.error("run stopped: %s; every finished window is stored", stopped)
                return 1
            finally:
                progress.close()
                scheduler.stop()
                if started_ray:
                    ray.shutdown()

        save()
    rows_now = [results[key] for key in ours]
    done = [r for r in rows_now if r["status"] == "done"]
    failed = [r for r in rows_now if r["status"] == "failed"]
    retryable = [r for r in failed if r.get("retryable")]
    for r in done:
        print(f"{r['id']}: {r['output']}")
    if failed:
        width = max(len(r["id"]) for r in failed)
        print("failed:\n" + "\n".join(f"  {r['id']:<{width}}  {r['error']}" for r in failed))
    print(f"{len(ours)} rows: {len(done)} done, {len(failed) - len(retryable)} failed for a reason a retry cannot fix, "
          f"{len(retryable)} failed after their retries (a re-run tries them again); results: {store.results_path}")
    return 1 if retryable else 0


def _count(windows: list | None) -> int | None:
    return None if windows is None else len(windows)


def _start_ray(cfg) -> None:
    """cluster=local: a Ray of our own on this machine, whatever RAY_ADDRESS says (it is set on every Ray
    node and after `ray start`; Ray would connect there and refuse our resources). cluster=address: the
    cluster at cluster.address."""
    if cfg.cluster.mode == "local":
        if os.environ.get("RAY_ADDRESS"):
            log.warning("cluster=local starts its own Ray on this machine; RAY_ADDRESS=%s is not used "
                        "(cluster=address cluster.address=auto runs there)", os.environ["RAY_ADDRESS"])
        # Ray's local cluster turns token authentication on and says so, on every run: nothing to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", **_local_resources(cfg), include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=cfg.cluster.address, include_dashboard=False, logging_level=logging.WARNING)
    take_actor_output()


def _gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()


def _group_sizes(cfg, gpus: int, device: str = "cpu") -> list[int]:
    """The renderers' sizes (actors each): `renderers` groups of sp_degree if given; else groups of
    sp_degree GPUs, GPUs left over becoming single-GPU renderers (so a run mixes groups and single
    GPUs); without GPUs, CPU_RENDERERS groups of sp_degree CPU actors. A cluster with no GPU yet
    (an autoscaler adds them on demand) needs cluster.renderers: how many to ask for."""
    g = cfg.cluster.sp_degree
    if cfg.cluster.renderers:
        return [g] * cfg.cluster.renderers
    if gpus:
        return [g] * (gpus // g) + [1] * (gpus % g)
    if device == "cuda":
        raise ConfigError("cluster.renderers: the cluster has no GPU yet, so how many renderers to ask its "
                          "autoscaler for must be given (at most its GPUs / cluster.sp_degree)")
    return [g] * CPU_RENDERERS


def _local_resources(cfg) -> dict:
    """An in-process Ray: logical CPUs for every worker we start (actors mostly wait on torch)."""
    actors = sum(_group_sizes(cfg, torch.cuda.device_count())) + cfg.cluster.encoders
    return {"num_cpus": max(os.cpu_count() or 1, actors + 2)}


def _actor_spec(cfg, gpus: int) -> ActorSpec:
    """model.device=auto is cuda when the cluster has GPUs as the run starts. On a cluster that has none
    yet, cuda asks for them: the renderers wait, as pending actors, for the GPUs an autoscaler adds."""
    device = "cuda" if (cfg.model.device == "cuda" or (cfg.model.device == "auto" and gpus)) else "cpu"
    if device == "cuda" and not gpus and cfg.cluster.mode == "local":
        raise ConfigError("model.device: cuda, but the Ray cluster has no GPUs")
    sizes = _group_sizes(cfg, gpus, device)
    if device == "cuda" and not gpus:
        log.info("the cluster has no GPU yet: asking for %d renderers of %d GPUs; each starts when its GPUs "
                 "arrive", len(sizes), cfg.cluster.sp_degree)
    elif cfg.model.device == "auto" and device == "cpu" and cfg.cluster.mode == "address":
        log.warning("model.device=auto: the cluster has no GPU now, so the renderers run on CPUs "
                    "(on a cluster whose autoscaler adds GPUs, set model.device=cuda)")
    # Ray starts an actor of num_cpus=1 with OMP_NUM_THREADS=1: where torch works on the CPU (every actor on
    # a CPU-only machine; the encoders beside GPU renderers with memory.encoder_device=cpu) it shares the cores.
    actors = sum(sizes) + cfg.cluster.encoders
    on_cpu = device == "cpu" or cfg.memory.encoder_device == "cpu"
    threads = max(1, (os.cpu_count() or 1) // actors) if on_cpu else None
    tiny = issubclass(OmegaConf.get_type(cfg.model), TinyModel)
    return ActorSpec(checkpoint_paths(cfg), model_spec(cfg), device, threads, tiny)


def _resources(cfg, gpus: int, device: str) -> Resources:
    """Ray resources per actor: a renderer member takes a GPU, less the share the encoders take when
    their models are on the GPU too (memory.encoder_device null); encoders on the CPU take none."""
    sizes = _group_sizes(cfg, gpus, device)
    renderer, encoder = {"CPU": 1}, {"num_cpus": 1}
    if device == "cuda":
        encoders_on_gpu = cfg.memory.encoder_device is None
        left = 1 - ENCODER_GPU_SHARE * cfg.cluster.encoders if encoders_on_gpu else 1
        if left < 0.5:
            raise ConfigError(f"cluster.encoders: {cfg.cluster.encoders} encoders on the GPU take "
                              f"{ENCODER_GPU_SHARE} of a GPU each; at most {int(0.5 / ENCODER_GPU_SHARE)}, "
                              "or memory.encoder_device=cpu")
        renderer["GPU"] = round(left, 6)
        if encoders_on_gpu:
            encoder["num_gpus"] = ENCODER_GPU_SHARE
    return Resources(
        renderer=renderer,
        encoder=encoder,
        group_sizes=sizes,
        encoders=cfg.cluster.encoders,
        max_in_flight=cfg.cluster.max_in_flight or 2 * len(sizes),
        max_retries=cfg.cluster.max_retries,
        actor_failure_limit=cfg.cluster.actor_failure_limit,
    )
