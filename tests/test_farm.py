"""The farm on a local Ray with two CPU renderers and the tiny model: a manifest renders, a killed
renderer's job resumes elsewhere from its last window with byte-identical output, a re-run skips
finished rows, and malformed rows get their reasons while the rest finish."""

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from hydra import compose, initialize_config_module

import farm.run
from farm.actors import SCRATCH_PREFIX, ActorSpec, DeviceTurns, renderer_scratch
from farm.config import ConfigError
from farm.progress import Progress
from farm.run import run
from farm.scheduler import Resources, Scheduler
from farm.stop import drivers
from farm.storage import RunStore
from farm.timings import DEVICE_STAGES, STAGES
from pipeline import media
from pipeline.assemble import ModelSpec
from pipeline.models.tiny import write_tiny_checkpoints
from pipeline.windows import frames_for_duration

JOBS = {"a": 0.5, "b": 1.3, "c": 2.1, "d": 0.9, "long": 5.5}  # seconds of speech
FAST = ["output.size=64x64", "window.frames=33", "window.motion=9", "sampler=distill", "cluster.renderers=2"]


def config(*overrides):
    with initialize_config_module("conf", version_base=None):
        return compose("config", overrides=[*FAST, *overrides])


def speech(path: Path, seconds: float, frequency: int) -> str:
    expr = f"0.5*sin(2*PI*{frequency}*t)*(0.6+0.4*sin(2*PI*4*t))"
    subprocess.run([media.ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"aevalsrc={expr}:s=22050:d={seconds}", str(path)], check=True)
    return path.name


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=6, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("jobs")
    shutil.copy(Path(__file__).parents[1] / "jobs" / "demo" / "astronaut.png", folder / "face.png")
    lines = [
        {"id": job, "image": "face.png", "audio": speech(folder / f"{job}.wav", seconds, 200 + 40 * i), "seed": i}
        for i, (job, seconds) in enumerate(JOBS.items())
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, manifest, tmp_path_factory) -> RunStore:
    root = tmp_path_factory.mktemp("undisturbed")
    assert run(config(f"manifest={manifest}", f"storage.root={root}")) == 0
    return RunStore(str(root))


def test_a_manifest_renders_every_row(undisturbed):
    results = {r["id"]: r for r in undisturbed.read_results()}
    assert set(results) == set(JOBS)
    for job, seconds in JOBS.items():
        row = results[job]
        assert row["status"] == "done" and row["error"] is None, row
        info = media.probe(row["output"])
        assert info.video.frame_count == row["frames"] == frames_for_duration(seconds)
        assert info.audio is not None and abs(info.duration - seconds) <= 1 / 25
        log = undisturbed.read_window_log(job)
        assert row["windows"] == len({r["window"] for r in log})
        assert row["actor"].startswith("renderer-")
        assert row["attempts"] == 1 and row["finished"] is not None and row["next_window"] is None
        assert [p.name for p in (Path(undisturbed.url) / "jobs" / job).iterdir()] == ["windows"]  # segments gone


def test_a_done_row_carries_its_timings_summed_from_the_window_log(undisturbed):
    for row in undisturbed.read_results():
        log = undisturbed.read_window_log(row["id"])
        stages = {stage: row[f"{stage}_seconds"] for stage in STAGES}
        assert all(seconds > 0 for stage, seconds in stages.items() if stage != "motion"), row
        assert (stages["motion"] > 0) == (row["windows"] > 1), row  # a job's last window encodes no motion
        assert row["render_seconds"] == pytest.approx(sum(r["finished"] - r["started"] for r in log))
        assert sum(stages[stage] for stage in DEVICE_STAGES) <= row["render_seconds"] <= row["seconds"]
        assert row["first_window_seconds"] == next(r["seconds"] for r in log if r["window"] == 0)
        devices = {r["devices"] for r in log}
        assert devices == {1}  # one CPU actor per renderer
        assert row["device_seconds_per_video_second"] == pytest.approx(row["render_seconds"] / row["duration"])
        assert row["encode_seconds"] > 0 and row["finish_seconds"] > 0
        for record in log:  # every window's steps, one per sampler step (distill: 4)
            assert len(record["steps"]) == 4 and sum(record["steps"]) == pytest.approx(record["stages"]["dit"])


def test_a_rerun_skips_finished_rows(ray_cluster, manifest, undisturbed):
    before = {job: undisturbed.read_window_log(job) for job in JOBS}
    assert run(config(f"manifest={manifest}", f"storage.root={undisturbed.url}")) == 0
    assert {job: undisturbed.read_window_log(job) for job in JOBS} == before  # nothing rendered again
    assert all(r["status"] == "done" for r in undisturbed.read_results())



def test_rows_are_skipped_by_what_they_were_rendered_from_not_by_id(ray_cluster, tmp_path, caplog, capsys):
    """A row is finished only while the bytes of its inputs, its own fields and the run's settings are
    those its output was made from (results.parquet: fingerprint): another manifest reusing an id with
    other speech, a changed seed and a changed image under the same name each render their row again,
    and the log names what changed; an unchanged re-run skips everything; a changed setting stops the
    run in one line naming the key, unless rerender=true."""
    folder, elsewhere, root = tmp_path / "jobs", tmp_path / "elsewhere", tmp_path / "run"
    folder.mkdir(), elsewhere.mkdir()
    shutil.copy(Path(__file__).parents[1] / "jobs" / "demo" / "astronaut.png", folder / "face.png")
    shutil.copy(folder / "face.png", folder / "other.png")
    rows = {"same": {"image": "face.png", "audio": speech(folder / "same.wav", 0.5, 220), "seed": 1},
            "seed": {"image": "face.png", "audio": speech(folder / "seed.wav", 0.5, 260), "seed": 2},
            "image": {"image": "other.png", "audio": speech(folder / "image.wav", 0.5, 300), "seed": 3}}

    def write(manifest: Path, jobs: dict) -> Path:
        manifest.write_text("".join(json.dumps({"id": job, **row}) + "\n" for job, row in jobs.items()))
        return manifest

    def render(manifest: Path, *extra: str) -> tuple[dict, dict]:
        caplog.clear()
        with caplog.at_level("INFO", logger="talkfarm"):
            assert run(config(f"manifest={manifest}", f"storage.root={root}", *extra)) == 0
        store = RunStore(str(root))
        return {job: store.read_window_log(job) for job in rows}, {r["id"]: r for r in store.read_results()}

    def rendered_again(before: dict, after: dict) -> set[str]:
        return {job for job in rows if after[job] != before[job]}

    manifest = write(folder / "manifest.jsonl", rows)
    first, results = render(manifest)
    assert all(results[job]["status"] == "done" and json.loads(results[job]["fingerprint"]) for job in rows)
    again, _ = render(manifest)
    assert again == first and "3 of 3 rows already finished: skipped" in caplog.text

    reused = write(elsewhere / "manifest.jsonl", {"same": {"image": str(folder / "face.png"), "seed": 1,
                                                           "audio": speech(elsewhere / "same.wav", 1.3, 220)}})
    after_reuse, results = render(reused, f"inputs.allow=[{folder}]")  # its picture is in the other folder
    assert rendered_again(first, after_reuse) == {"same"} and "same: its audio changed since it was rendered" in caplog.text
    assert results["same"]["frames"] == frames_for_duration(1.3) and results["same"]["attempts"] == 1

    rows["seed"]["seed"] = 4
    (folder / "other.png").write_bytes((folder / "face.png").read_bytes()[:-1] + b"\0")  # same name, other bytes
    # a dry run says beforehand what the run will do with each row, and writes nothing
    files = sorted(root.rglob("*"))
    capsys.readouterr()
    assert run(config(f"manifest={write(manifest, rows)}", f"storage.root={root}", "dry_run=true")) == 0
    planned = {line.split()[1]: line.split(maxsplit=4)[4] for line in capsys.readouterr().out.splitlines()[1:4]}
    assert planned == {"same": "render again from nothing: its audio changed since it was rendered",
                       "seed": "render again from nothing: its row changed since it was rendered",
                       "image": "render again from nothing: its image changed since it was rendered"}
    assert sorted(root.rglob("*")) == files
    after_edits, results = render(write(manifest, rows))
    assert rendered_again(after_reuse, after_edits) == {"same", "seed", "image"}
    assert "seed: its row changed" in caplog.text and "image: its image changed" in caplog.text
    assert results["same"]["frames"] == frames_for_duration(0.5)

    with pytest.raises(ConfigError, match=r"^storage.root: 3 rows of .* were rendered with output.crf=18 \(now 20\);"):
        run(config(f"manifest={manifest}", f"storage.root={root}", "output.crf=20"))
    unchanged, _ = render(manifest)  # the refused run changed nothing
    assert unchanged == after_edits
    with_crf, results = render(manifest, "output.crf=20", "rerender=true", "storage.keep_windows=true")
    assert rendered_again(after_edits, with_crf) == set(rows) and all(r["status"] == "done" for r in results.values())
    assert all(RunStore(str(root)).load_state(job) is not None for job in rows)  # kept, as asked
    store = RunStore(str(root))
    assert len(store.fs.ls(f"{root}/configs")) == 6  # one per run that started, none for the refused one
    assert yaml.safe_load(store.read_config())["storage"]["root"] == str(root)

def test_one_renderer_starts_its_next_job_while_it_still_stores_the_last_window(ray_cluster, manifest, undisturbed, tmp_path):
    """The next job's first window takes the device before the current job's last window is encoded
    and stored (the GPU does not wait on x264 at a job's end), and both videos are those of a run
    without the overlap."""
    two = manifest.parent / "two.jsonl"
    two.write_text("".join(json.dumps({"id": job, "image": "face.png", "audio": f"{job}.wav", "seed": seed}) + "\n"
                           for job, seed in (("long", 4), ("b", 1))))  # the seeds of the undisturbed run
    store = RunStore(str(tmp_path / "run"))
    assert run(config(f"manifest={two}", f"storage.root={store.url}", "cluster.renderers=1")) == 0
    first, second = sorted((store.read_window_log(job) for job in ("long", "b")), key=lambda log: log[0]["started"])
    assert len(first) > 1 and {r["actor"] for r in first + second} == {"renderer-0"}
    assert first[-2]["finished"] <= second[0]["started"] < first[-1]["finished"], (first[-2:], second[0])
    originals = {r["id"]: r["output"] for r in undisturbed.read_results()}
    for row in store.read_results():
        assert Path(row["output"]).read_bytes() == Path(originals[row["id"]]).read_bytes(), row["id"]


def _sigterm_to_its_process(actor: str) -> None:
    """SIGTERM to the actor's worker process, as a node's shutdown or a pod's eviction sends it."""
    from ray._private.state import actors  # the GCS's actor table: the only place Ray names an actor's pid

    os.kill(next(a["Pid"] for a in actors().values() if a["Name"] == actor and a["State"] == "ALIVE"), signal.SIGTERM)


@pytest.mark.parametrize("kill", [lambda actor: ray.kill(ray.get_actor(actor), no_restart=True), _sigterm_to_its_process],
                         ids=["ray.kill", "SIGTERM"])
def test_a_killed_renderer_hands_its_job_on_without_losing_windows(ray_cluster, manifest, undisturbed, tmp_path, kill):
    store = RunStore(str(tmp_path / "run"))
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("code", run(config(f"manifest={manifest}", f"storage.root={store.url}"))))
    worker.start()
    deadline = time.time() + 300
    while not store.read_window_log("long") and time.time() < deadline:
        time.sleep(0.05)
    victim = store.read_window_log("long")[0]["actor"]
    kill(victim)
    worker.join(timeout=600)
    assert outcome.get("code") == 0

    log = store.read_window_log("long")
    attempts = {r["attempt"] for r in log}
    assert attempts == {1, 2}, log  # it was interrupted, and resumed
    assert [r["window"] for r in log] == sorted({r["window"] for r in log})  # every window rendered once
    resumed_from = min(r["window"] for r in log if r["attempt"] == 2)
    assert resumed_from > 0  # not from window 0
    assert all(r["actor"] != victim for r in log if r["attempt"] == 2)
    for row in store.read_results():
        assert row["status"] == "done", row
        original = next(r for r in undisturbed.read_results() if r["id"] == row["id"])
        assert Path(row["output"]).read_bytes() == Path(original["output"]).read_bytes(), row["id"]


def test_a_finished_row_writes_only_its_own_results_file_and_the_table_is_compacted_at_the_end(
    ray_cluster, manifest, tmp_path, monkeypatch
):
    """Per finished row one small file (RunStore.put_result), not the whole table again: with compaction
    held off, a run of 3 rows writes results.parquet twice (its start and its end), and after the run it
    holds every row and no row file is left."""
    monkeypatch.setattr(farm.run, "COMPACT_EVERY_S", 10**9)
    writes = {"table": 0, "rows": []}
    write_results, put_result = RunStore.write_results, RunStore.put_result

    def counted_table(self, rows):
        writes["table"] += 1
        return write_results(self, rows)

    def counted_row(self, row):
        writes["rows"].append(row["id"])
        return put_result(self, row)

    monkeypatch.setattr(RunStore, "write_results", counted_table)
    monkeypatch.setattr(RunStore, "put_result", counted_row)
    three = manifest.parent / "three.jsonl"
    three.write_text("".join(json.dumps({"id": job, "image": "face.png", "audio": f"{job}.wav"}) + "\n" for job in "abd"))
    store = RunStore(str(tmp_path / "run"))
    assert run(config(f"manifest={three}", f"storage.root={store.url}")) == 0
    assert writes["table"] == 2 and sorted(writes["rows"]) == ["a", "b", "d"]
    assert [r["status"] for r in store.read_results()] == ["done"] * 3 and not list((tmp_path / "run" / "results").iterdir())


def test_malformed_rows_get_reasons_and_the_rest_finish(ray_cluster, manifest, tmp_path, capsys):
    """Each bad row fails with its own reason (rows sharing an id all fail, each naming the others) and the
    rest render; results.parquet holds the rows in manifest order, and the run ends with a table of the
    failed rows and the counts against the manifest's rows."""
    folder = manifest.parent
    (folder / "notes.wav").write_text("this is not audio")
    rows = [
        {"id": "good", "image": "face.png", "audio": "a.wav"},
        {"id": "missing", "image": "face.png", "audio": "nowhere.wav"},
        {"id": "unreadable", "image": "face.png", "audio": "notes.wav"},
        {"id": "typo", "image": "face.png", "audio": "d.wav", "stpes": 3},
        {"id": "good", "image": "face.png", "audio": "d.wav", "output": "again.mp4"},
        {"id": "fine", "image": "face.png", "audio": "d.wav"},
    ]
    bad = folder / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = RunStore(str(tmp_path / "run"))
    # failed the manifest's checks, which a retry cannot fix: the run itself succeeded
    assert run(config(f"manifest={bad}", f"storage.root={store.url}")) == 0
    in_order = store.read_results()
    assert [r["id"] for r in in_order] == ["good (row 1)", "missing", "unreadable", "typo", "good (row 5)", "fine"]
    results = {r["id"]: r for r in in_order}
    assert results["unreadable"]["retryable"] is None and results["missing"]["retryable"] is None  # checked every run
    assert results["fine"]["status"] == "done"
    assert "nowhere.wav" in results["missing"]["error"]
    assert "notes.wav" in results["unreadable"]["error"]
    assert "unknown column 'stpes'" in results["typo"]["error"]
    assert results["good (row 1)"]["error"] == "id: 'good' is also the id of row 5"
    assert results["good (row 5)"]["error"] == "id: 'good' is also the id of row 1"
    assert all(r["finished"] is not None for r in in_order)
    printed = capsys.readouterr().out.splitlines()
    failed = printed[printed.index("failed:") + 1:-1]
    assert [line.split()[0] for line in failed] == ["good", "missing", "unreadable", "typo", "good"]
    assert "good (row 5)  id: 'good' is also the id of row 1" in failed[4]
    assert printed[-1].startswith("6 rows: 1 done, 5 failed for a reason a retry cannot fix, 0 failed after")


def test_past_its_retry_budget_a_job_fails_with_the_reason(ray_cluster, manifest, tmp_path):
    store = RunStore(str(tmp_path / "run"))
    outcome = {}
    overrides = (f"manifest={manifest}", f"storage.root={store.url}", "cluster.max_retries=0")
    worker = threading.Thread(target=lambda: outcome.setdefault("code", run(config(*overrides))))
    worker.start()
    deadline = time.time() + 300
    while not store.read_window_log("long") and time.time() < deadline:
        time.sleep(0.05)
    ray.kill(ray.get_actor(store.read_window_log("long")[0]["actor"]), no_restart=True)
    worker.join(timeout=600)
    assert outcome.get("code") == 1
    results = {r["id"]: r for r in store.read_results()}
    assert results["long"]["status"] == "failed" and "died" in results["long"]["error"], results["long"]
    assert results["long"]["retryable"] is True  # a lost worker: the run failed, and a re-run tries the row again
    assert all(results[job]["status"] == "done" for job in JOBS if job != "long")
    assert store.load_state("long").next_window >= 1  # the finished windows are kept for a re-run


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_records_the_interrupted_rows_and_a_rerun_resumes_them_counting_both_runs(manifest, tmp_path, signum, code, said):
    """Ctrl-C, and SIGTERM to the driver alone (what `ray job stop` and Kubernetes send before they kill):
    the interrupted rows are recorded with the window they resume at, the actors are ended, and the
    driver exits at once (within seconds here: docs/reliability.md); a re-run resumes them (after Ctrl-C)."""
    root = tmp_path / "run"
    command = ["talkfarm", f"manifest={manifest}", f"storage.root={root}", *FAST]
    # A temp folder of the run's own (short: Ray puts sockets there), so that the renderers' scratch
    # folders can be counted without seeing other tests' renderers.
    temp = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    env = os.environ | {"TMPDIR": str(temp)}
    output = tmp_path / "output.log"  # a file, not a pipe: a full pipe would stall the run
    interrupted = subprocess.Popen(command, stdout=output.open("w"), stderr=subprocess.STDOUT, env=env)
    store = RunStore(str(root))
    deadline = time.time() + 300
    while not store.read_window_log("long") and time.time() < deadline:
        time.sleep(0.05)
    sent = time.monotonic()
    if signum == signal.SIGTERM:  # as the Ray head pod's preStop hook sends it (k8s/), to this driver alone
        assert interrupted.pid in drivers()
        stopper = subprocess.run([sys.executable, "-m", "farm.stop", str(interrupted.pid)], capture_output=True, text=True)
        assert stopper.returncode == 0 and stopper.stdout == "talkfarm drivers stopped: 1 of 1\n", stopper
    else:
        interrupted.send_signal(signum)
    assert interrupted.wait(timeout=120) == code
    print(f"exited {time.monotonic() - sent:.1f} s after the signal")  # for docs/reliability.md's bound
    assert f"{said}: every finished window is stored; run the same command again to resume" in output.read_text()
    kept = store.load_state("long").next_window
    assert kept >= 1
    first = {r["id"]: r for r in store.read_results()}
    assert first["long"]["status"] == "interrupted" and first["long"]["next_window"] == kept, first["long"]
    assert first["long"]["attempts"] == 1 and first["long"]["seconds"] > 0
    assert list(temp.glob(f"{SCRATCH_PREFIX}*"))  # the busy renderer was killed and left its scratch
    if signum == signal.SIGTERM:  # what comes next, the resume, is the same after either signal
        shutil.rmtree(temp, ignore_errors=True)
        return

    assert subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env).returncode == 0
    results = {r["id"]: r for r in store.read_results()}
    assert all(r["status"] == "done" for r in results.values())
    log = store.read_window_log("long")
    assert [r["window"] for r in log] == sorted({r["window"] for r in log})  # each window once: it went on
    assert {r["attempt"] for r in log} == {1, 2}  # from where it stopped, as the second attempt
    assert results["long"]["attempts"] == 2 and results["long"]["next_window"] is None
    assert results["long"]["seconds"] > first["long"]["seconds"]
    assert results["long"]["render_seconds"] == pytest.approx(sum(r["seconds"] for r in log))  # both runs' windows
    # every renderer's scratch folder is gone: the killed run's removed by the next run's renderers,
    # theirs when the run ended
    assert [p.name for p in temp.glob(f"{SCRATCH_PREFIX}*")] == []
    shutil.rmtree(temp, ignore_errors=True)


def on_a_terminal(command: list[str], **kwargs) -> tuple[int, str]:
    """Run `command` with its stderr on a pseudo-terminal (as a user's shell gives it): (status, what the
    terminal got)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=terminal, **kwargs)
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(controller)
    return process.wait(timeout=60), screen.decode(errors="replace")


def test_a_terminal_shows_one_updating_line_with_the_window_stage_and_the_actors_output_goes_to_the_run_log(manifest, tmp_path):
    root = tmp_path / "run"
    command = ["talkfarm", f"job.image={manifest.parent / 'face.png'}", f"job.audio={manifest.parent / 'long.wav'}",
               f"storage.root={root}", *FAST, "cluster.renderers=1"]
    status, screen = on_a_terminal(command, cwd=tmp_path)
    assert status == 0, screen[-2000:]
    lines = screen.replace("\r\n", "\n").split("\n")
    # the progress line is redrawn in place (carriage return, erase line), never a line per update
    assert "\r\033[K" in screen and len(lines) < 10, lines
    windows = len(RunStore(str(root)).read_window_log("long"))
    assert f"windows 0/~{windows}" in screen  # the total from the start, by the audio's duration
    assert re.search(rf"long window \d/{windows}: (sampling step \d/4|decoding|encoding)", screen), screen[-3000:]
    assert "pid=" not in screen and "Token authentication" not in screen  # neither the actors' output nor Ray's
    log = next((root / "logs").glob("*.log")).read_text()  # the run's log has the actors' output
    assert "(Renderer pid=" in log and "pipeline.render: job long: window 1/" in log and "(Encoder pid=" in log
    assert [p.stem for p in (root / "logs").glob("*.log")] == [p.stem for p in (root / "configs").glob("*.yaml")]


def test_a_renderer_whose_jobs_keep_failing_is_replaced(ray_cluster, manifest, tmp_path, caplog):
    one = manifest.parent / "one.jsonl"
    one.write_text(json.dumps({"id": "a", "image": "face.png", "audio": "a.wav"}) + "\n")
    store = RunStore(str(tmp_path / "run"))
    store.save_config("")
    # a state file that cannot be read (a directory: an OSError, which a retry might get past): every
    # attempt fails inside the renderer
    (tmp_path / "run" / "jobs" / "a" / "state.json").mkdir(parents=True)
    overrides = (f"manifest={one}", f"storage.root={store.url}", "cluster.max_retries=1", "cluster.actor_failure_limit=1")
    with caplog.at_level("WARNING", logger="farm.scheduler"):
        assert run(config(*overrides)) == 1
    replaced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("replacing renderer-")]
    assert len(replaced) == 2 and all("1 jobs failed in a row" in m for m in replaced), replaced
    row = store.read_results()[0]
    assert row["status"] == "failed" and row["attempts"] == 2 and row["retryable"] is True, row


def test_a_sequence_parallel_group_renders_what_one_renderer_renders(ray_cluster, manifest, undisturbed, tmp_path):
    """cluster.sp_degree=2: one renderer made of two actors (gloo) splitting every forward; a member
    killed mid-job takes its group down, and the job resumes on a new group from its last window."""
    store = RunStore(str(tmp_path / "run"))
    overrides = (f"manifest={manifest}", f"storage.root={store.url}", "cluster.sp_degree=2", "cluster.renderers=1")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("code", run(config(*overrides))))
    worker.start()
    deadline = time.time() + 300
    while not store.read_window_log("long") and time.time() < deadline:
        time.sleep(0.05)
    ray.kill(ray.get_actor(store.read_window_log("long")[0]["actor"] + "-rank1"), no_restart=True)
    worker.join(timeout=600)
    assert outcome.get("code") == 0

    log = store.read_window_log("long")
    assert {r["attempt"] for r in log} == {1, 2} and min(r["window"] for r in log if r["attempt"] == 2) > 0
    for row in store.read_results():
        original = next(r for r in undisturbed.read_results() if r["id"] == row["id"])
        assert row["status"] == "done" and row["frames"] == original["frames"]
        ours, theirs = media.read_video_frames(row["output"], fps=None), media.read_video_frames(original["output"], fps=None)
        assert (ours - theirs).abs().max() < 0.05, row["id"]  # fp32 sums in another order, then H.264


@pytest.mark.parametrize("gpus, degree, sizes", [(8, 1, [1] * 8), (8, 2, [2] * 4), (5, 2, [2, 2, 1]), (3, 4, [1, 1, 1])])
def test_gpus_make_groups_of_sp_degree_and_the_rest_single_renderers(gpus, degree, sizes):
    import farm.run

    resources = farm.run._resources(config(f"cluster.sp_degree={degree}", "cluster.renderers=null", "memory=24gb"),
                                    gpus, "cuda")
    assert resources.group_sizes == sizes
    assert resources.renderer == {"CPU": 1, "GPU": 1}


def test_encoders_on_the_gpu_ask_ray_for_a_share_of_one_that_each_renderer_leaves_free():
    """memory=fast keeps T5, CLIP and wav2vec2 on the GPU: the encoder asks for a tenth of a GPU and a
    renderer for the rest, so on one GPU both fit and on eight the encoder sits beside one of the eight
    renderers; memory=24gb puts the encoders on the CPU, and a renderer takes a whole GPU."""
    import farm.run
    from farm.config import ConfigError

    fast = farm.run._resources(config("memory=fast", "cluster.renderers=null"), 8, "cuda")
    assert fast.encoder == {"num_cpus": 1, "num_gpus": 0.1} and fast.renderer == {"CPU": 1, "GPU": 0.9}
    assert 8 * fast.renderer["GPU"] + fast.encoder["num_gpus"] <= 8 and fast.group_sizes == [1] * 8
    two = farm.run._resources(config("memory=fast", "cluster.encoders=2"), 1, "cuda")
    assert two.renderer["GPU"] + 2 * two.encoder["num_gpus"] == pytest.approx(1)
    assert farm.run._resources(config("memory=24gb"), 1, "cuda").encoder == {"num_cpus": 1}
    with pytest.raises(ConfigError, match="^cluster.encoders: 6 encoders on the GPU"):
        farm.run._resources(config("memory=fast", "cluster.encoders=6"), 1, "cuda")


def test_encoders_on_the_cpu_beside_gpu_renderers_get_torch_threads():
    """Ray starts an actor of num_cpus=1 with OMP_NUM_THREADS=1, which would run T5 (5.7B) on one core
    with memory=24gb; the encoders then get the machine's cores shared among the actors, as every actor
    does on a CPU-only machine. All on the GPU, torch's CPU threads are left as Ray sets them."""
    import farm.run

    cores = os.cpu_count()
    assert farm.run._actor_spec(config("memory=24gb", "model.device=cuda"), gpus=1).cpu_threads == max(1, cores // 2)
    assert farm.run._actor_spec(config("memory=fast", "model.device=cuda"), gpus=1).cpu_threads is None
    assert farm.run._actor_spec(config("model.device=cpu", "cluster.renderers=1"), gpus=0).cpu_threads == max(1, cores // 2)


def test_a_cluster_without_gpus_yet_gets_gpu_renderers_asked_for_not_cpu_ones(caplog):
    """An autoscaling cluster starts with no GPU worker: model.device=cuda asks for cluster.renderers GPU
    renderers (they wait for the autoscaler); without a count it refuses to start, naming the setting;
    model.device=auto renders on CPUs there, and says how to ask for GPUs."""
    import farm.run
    from farm.config import ConfigError

    cfg = config("cluster=address", "model.device=cuda", "cluster.renderers=3", "cluster.sp_degree=2")
    assert farm.run._actor_spec(cfg, gpus=0).device == "cuda"
    resources = farm.run._resources(cfg, 0, "cuda")
    assert resources.group_sizes == [2, 2, 2] and resources.renderer["GPU"] > 0
    with pytest.raises(ConfigError, match="^cluster.renderers: the cluster has no GPU yet"):
        farm.run._actor_spec(config("cluster=address", "model.device=cuda", "cluster.renderers=null"), gpus=0)
    with pytest.raises(ConfigError, match="^model.device: cuda, but the Ray cluster has no GPUs"):
        farm.run._actor_spec(config("model.device=cuda"), gpus=0)  # cluster=local: nothing will add one
    with caplog.at_level("WARNING", logger="talkfarm"):
        assert farm.run._actor_spec(config("cluster=address", "cluster.renderers=null"), gpus=0).device == "cpu"
    assert any("set model.device=cuda" in r.getMessage() for r in caplog.records)


def test_an_error_a_retry_cannot_fix_fails_the_row_at_once_with_its_traceback_logged_once(
    ray_cluster, manifest, tmp_path, caplog
):
    one = manifest.parent / "one.jsonl"
    one.write_text(json.dumps({"id": "a", "image": "face.png", "audio": "a.wav"}) + "\n")
    store = RunStore(str(tmp_path / "run"))
    store.save_config("")
    (tmp_path / "run" / "jobs" / "a").mkdir(parents=True)
    (tmp_path / "run" / "jobs" / "a" / "state.json").write_text("{not json")  # the same on every attempt
    overrides = (f"manifest={one}", f"storage.root={store.url}", "cluster.max_retries=3")
    with caplog.at_level("ERROR", logger="farm.scheduler"):
        assert run(config(*overrides)) == 0  # a row failed for good: not a failure of the run
    row = store.read_results()[0]
    assert row["status"] == "failed" and row["attempts"] == 1 and row["retryable"] is False, row
    assert row["error"].startswith("JSONDecodeError: Expecting property name"), row
    tracebacks = [r.getMessage() for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1 and "json.decoder.JSONDecodeError" in tracebacks[0] and "load_state" in tracebacks[0]

    assert run(config(*overrides)) == 0
    assert store.read_results()[0]["attempts"] == 1  # a re-run skips it ...
    assert run(config(*overrides, "retry_failed=true")) == 0
    assert store.read_results()[0]["attempts"] == 2  # ... unless asked


def test_a_renderer_that_cannot_load_stops_the_run_and_keeps_the_rows_for_a_rerun(ray_cluster, manifest, tmp_path, caplog):
    weights = tmp_path / "weights"
    paths = write_tiny_checkpoints(weights)
    paths.vae().write_bytes(b"not a checkpoint")  # the tiny set stays 'complete': it is not rewritten
    store = RunStore(str(tmp_path / "run"))
    with caplog.at_level("ERROR", logger="talkfarm"):
        code = run(config(f"manifest={manifest}", f"storage.root={store.url}", f"model.dir={weights}"))
    assert code == 1
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run stopped:")]
    assert len(stopped) == 1 and "could not load its models: " in stopped[0] and "Wan2.1_VAE.pth" in stopped[0], stopped
    assert all(r["status"] != "failed" for r in store.read_results())  # nothing marked failed: a re-run renders them


def test_a_follower_lost_after_its_leader_finished_replaces_the_group_once(ray_cluster, tmp_path):
    """Rank 1 of a group fails after rank 0 finished its job (the group is idle again): the group is
    replaced, and only the new one is left to take a job."""
    spec = ActorSpec(write_tiny_checkpoints(tmp_path / "tiny"), ModelSpec(), "cpu", cpu_threads=1)
    resources = Resources(renderer={"CPU": 1}, encoder={"num_cpus": 1}, group_sizes=[], encoders=0,
                          max_in_flight=1, max_retries=0, actor_failure_limit=1)
    scheduler = Scheduler(spec, str(tmp_path / "run"), resources, Progress(), lambda row: None)
    try:
        group = scheduler._spawn(2)
        ray.kill(group.actors[1], no_restart=True)
        follower = group.actors[1].render.remote(None, None, None, 1, 0)  # fails: the actor is dead
        scheduler.followers[follower] = (None, group)  # its leader's job has ended
        ray.wait([follower], timeout=60)
        scheduler._on_follower(follower)
        assert group not in scheduler.groups
        assert [g.size for g in scheduler.groups] == [2] and list(scheduler.starting.values()) == scheduler.groups
        assert scheduler.followers == {} and scheduler.rendering == {}
    finally:
        scheduler.stop()


def test_cluster_local_starts_its_own_ray_whatever_ray_address_says(tmp_path):
    """RAY_ADDRESS is set on every Ray node and after `ray start`: cluster=local still starts a Ray of
    its own (and says so) instead of connecting there and failing."""
    code = (
        "import logging, ray, farm.run; from hydra import compose, initialize_config_module; "
        "logging.basicConfig(level=logging.WARNING)\n"
        "with initialize_config_module('conf', version_base=None): cfg = compose('config', overrides=['cluster.renderers=1'])\n"
        "farm.run._start_ray(cfg); print('local Ray:', ray.get_runtime_context().gcs_address != '127.0.0.1:1'); ray.shutdown()"
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "local Ray: True\n", done.stderr[-2000:]
    assert "cluster=local starts its own Ray on this machine; RAY_ADDRESS=127.0.0.1:1 is not used" in done.stderr


def test_a_renderer_scratch_folder_replaces_those_of_renderers_that_are_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now, as after ray.kill
    stale = tmp_path / f"{SCRATCH_PREFIX}{gone.pid}"
    (stale / "job" / "segment-00000.mp4").parent.mkdir(parents=True)
    (stale / "job" / "segment-00000.mp4").write_bytes(b"left by a killed renderer")
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getppid()}"  # another renderer, still running
    alive.mkdir()
    scratch = renderer_scratch()
    assert scratch == tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}" and scratch.is_dir()
    assert not stale.exists() and alive.is_dir()


def test_device_turns_let_jobs_on_the_device_in_their_numbered_order_whichever_call_starts_first():
    turns, order = DeviceTurns(), []

    def job(turn: int) -> None:
        with turns.hold(turn):
            order.append(turn)

    later = threading.Thread(target=job, args=(1,))
    later.start()
    time.sleep(0.2)
    assert order == []  # turn 1 waits for turn 0
    turns.done(0)  # turn 0's job ended before it took the device (it failed, say)
    later.join(timeout=10)
    assert order == [1]
    job(2)
    assert order == [1, 2]
