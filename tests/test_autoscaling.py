"""Renderers on a cluster whose GPUs come later, as on an autoscaling KubeRay cluster: a real two-node
Ray started with `ray start` (the head without the renderers' resource, a second node declaring one
GPU a while into the run), the renderers themselves on the CPU device with the tiny model.

The driver runs in a process of its own: the other farm tests keep a Ray of their own in theirs."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import media

DRIVER = textwrap.dedent("""
    import json, logging, sys, threading, time
    import ray
    from hydra import compose, initialize_config_module
    from farm.actors import ActorSpec
    from farm.config import render_settings
    from farm.manifest import read_manifest, settings_for
    from farm.progress import Progress
    from farm.scheduler import Resources, Scheduler
    from farm.storage import RunStore
    from pipeline.assemble import ModelSpec
    from pipeline.models.tiny import write_tiny_checkpoints

    address, manifest, root, tiny, signal_file = sys.argv[1:]
    logging.basicConfig(level=logging.INFO)
    ray.init(address=address, logging_level="WARNING")
    with initialize_config_module("conf", version_base=None):
        cfg = compose("config", overrides=["output.size=64x64", "window.frames=33", "window.motion=9", "sampler=distill"])
    settings = render_settings(cfg)
    rows, errors = read_manifest(manifest, settings)
    spec = ActorSpec(write_tiny_checkpoints(tiny), ModelSpec(), "cpu", cpu_threads=1)
    # Two renderers of one GPU each, asked for on a cluster that has no GPU yet
    resources = Resources(renderer={"CPU": 1, "GPU": 1}, encoder={"num_cpus": 1}, group_sizes=[1, 1], encoders=1,
                          max_in_flight=4, max_retries=0, actor_failure_limit=1)
    results = []
    scheduler = Scheduler(spec, root, resources, Progress(), results.append)
    scheduler.start()
    worker = threading.Thread(target=scheduler.run, args=([(r, settings_for(r, settings)) for r in rows], {}))
    worker.start()
    time.sleep(20)  # the encodes are done by then; no renderer can start
    before = {"windows": sum(len(RunStore(root).read_window_log(r.job.id)) for r in rows),
              "loaded": [g.name for g in scheduler.groups if g.loaded], "waiting": len(scheduler.starting)}
    open(signal_file, "w").write("add the GPU node")
    worker.join(timeout=600)
    for _ in range(60):  # a killed actor's resources come back within a moment
        if ray.available_resources().get("GPU", 0) == 1:
            break
        time.sleep(0.5)
    after = {"gpus_free": ray.available_resources().get("GPU", 0), "groups": [g.name for g in scheduler.groups]}
    scheduler.stop()
    print(json.dumps({"before": before, "after": after, "results": results}, default=str))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(*args: str, env: dict) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own: stopped by `_stop`, which ends only this node
    (`ray stop` would end every Ray on the machine, other tests' too)."""
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    return subprocess.Popen([ray, "start", *args, "--block"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(node: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
            node.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _wait_for_port(address: str, seconds: float = 60) -> None:
    host, port = address.split(":")
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {address}")


@pytest.fixture
def head(tmp_path):
    """A Ray head with CPUs only, on a free port; it and every node started with `nodes` stop afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="tfa-", dir="/tmp"))  # short: Ray puts sockets there
    # token authentication off: these nodes and the driver share one machine and one user
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    address = f"127.0.0.1:{_free_port()}"
    nodes = [_ray_node("--head", f"--port={address.split(':')[1]}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
                       "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}", env=env)]
    _wait_for_port(address)
    yield address, env, nodes
    for node in reversed(nodes):
        _stop(node)
    shutil.rmtree(temp, ignore_errors=True)


def test_renderers_wait_for_gpus_start_as_they_arrive_and_are_let_go_when_the_queue_drains(head, tmp_path):
    address, env, nodes = head
    folder = tmp_path / "jobs"
    folder.mkdir()
    shutil.copy(Path(__file__).parents[1] / "jobs" / "demo" / "astronaut.png", folder / "face.png")
    lines = []
    for i, seconds in enumerate((1.3, 0.5, 0.9)):
        subprocess.run([media.ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"sine=frequency={220 + 40 * i}:sample_rate=16000:duration={seconds}", str(folder / f"{i}.wav")],
                       check=True)
        lines.append({"id": f"job{i}", "image": "face.png", "audio": f"{i}.wav", "seed": i})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    signal_file = tmp_path / "add-gpu"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, address, str(folder / "manifest.jsonl"), str(tmp_path / "run"),
         str(tmp_path / "tiny"), str(signal_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env | {"PYTHONPATH": str(Path(__file__).parents[1])},
        cwd=Path(__file__).parents[1])
    try:
        for _ in range(600):
            if signal_file.exists() or driver.poll() is not None:
                break
            time.sleep(0.5)
        assert signal_file.exists(), driver.communicate()[1][-3000:]
        # the node an autoscaler would add
        nodes.append(_ray_node(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=1", env=env))
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])

    # Before the GPU node: both renderers waiting, nothing rendered
    assert report["before"] == {"windows": 0, "loaded": [], "waiting": 2}, report["before"]
    # After: every row done on the one renderer that got the GPU; the other was let go once no job was
    # left to start, still waiting; the GPU is free again once the last renderer is gone
    assert sorted(r["id"] for r in report["results"]) == ["job0", "job1", "job2"]
    assert all(r["status"] == "done" for r in report["results"]), report["results"]
    assert len({r["actor"] for r in report["results"]}) == 1
    assert "no job left to start: letting" in err
    assert report["after"]["groups"] == [] and report["after"]["gpus_free"] == 1, report["after"]
