"""farm.storage: round trips, and the atomicity promises, on a local directory and on fsspec's in-memory
filesystem (which stands in for object stores: no directories, `mv` is copy + delete)."""

import datetime
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from farm import storage
from farm.storage import RESULTS_SCHEMA, RunStore
from pipeline.job import ResumeState


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield RunStore(str(tmp_path / "runs" / "run-1"))  # parents do not exist yet
        return
    root = f"memory://test-{uuid.uuid4().hex}"
    yield RunStore(root)
    fs, path = fsspec.core.url_to_fs(root)  # the in-memory store is process-wide
    if fs.exists(path):
        fs.rm(path, recursive=True)


def files(store: RunStore, *parts: str) -> list[str]:
    """Every file name under a directory of the store, temporary ones included."""
    directory = "/".join([store.root, *parts])
    return sorted(path.rsplit("/", 1)[1] for path in store.fs.find(directory))


def state(next_window: int, segments: int, seed: int) -> ResumeState:
    latents = torch.randn(16, 2, 4, 6, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return ResumeState(next_window, latents, [f"/scratch/segment-{i:05d}.mp4" for i in range(segments)])


def names(segments: int) -> list[str]:
    return [f"segment-{i:05d}.mp4" for i in range(segments)]


class Crash(BaseException):
    """The process dies: unlike an exception, nothing gets to clean up."""


# --- state ----------------------------------------------------------------------------------------------


def test_state_round_trip(store):
    assert store.load_state("job-a") is None and store.next_window("job-a") == 0

    store.save_state("job-a", state(2, 2, seed=0), names(2))
    loaded = store.load_state("job-a")
    assert loaded.next_window == 2 == store.next_window("job-a")  # the latter from state.json alone
    assert loaded.segments == names(2)
    assert loaded.motion_latents.dtype == torch.bfloat16
    assert torch.equal(loaded.motion_latents, state(2, 2, seed=0).motion_latents)

    # The last window leaves no motion latents; the previous tensor file goes with its state.
    store.save_state("job-a", ResumeState(3, None, ["/scratch/a", "/scratch/b", "/scratch/c"]), names(3))
    loaded = store.load_state("job-a")
    assert (loaded.next_window, loaded.motion_latents, loaded.segments) == (3, None, names(3))
    assert files(store, "jobs", "job-a") == ["state.json"]


def test_one_tensor_file_per_job(store):
    for k in range(1, 4):
        store.save_state("job-a", state(k, k, seed=k), names(k))
    tensors = [name for name in files(store, "jobs", "job-a") if name.endswith(".safetensors")]
    assert len(tensors) == 1 and tensors[0].startswith("state-00003-")
    assert torch.equal(store.load_state("job-a").motion_latents, state(3, 3, seed=3).motion_latents)


def test_state_survives_death_between_the_two_writes(store, monkeypatch):
    store.save_state("job-a", state(2, 2, seed=0), names(2))

    pipe_file = store.fs.pipe_file

    def dying_pipe_file(path, data, **kwargs):
        if "state.json" in path:  # the tensor is in place; half of the new json is written, then death
            pipe_file(path, data[: len(data) // 2], **kwargs)
            raise Crash
        pipe_file(path, data, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(store.fs, "pipe_file", dying_pipe_file)
        with pytest.raises(Crash):
            store.save_state("job-a", state(3, 3, seed=1), names(3))

    left = files(store, "jobs", "job-a")
    assert sum(name.endswith(".safetensors") for name in left) == 2  # the old tensor and the orphan
    assert "state.json" in left and any(name.startswith(".state.json.") for name in left)

    # A fresh reader sees the previous state, whole.
    loaded = RunStore(store.fs.unstrip_protocol(store.root)).load_state("job-a")
    assert loaded.next_window == 2 and loaded.segments == names(2)
    assert torch.equal(loaded.motion_latents, state(2, 2, seed=0).motion_latents)

    # The resumed job saves again: the orphaned tensor is swept.
    store.save_state("job-a", state(3, 3, seed=1), names(3))
    assert sum(name.endswith(".safetensors") for name in files(store, "jobs", "job-a")) == 1
    assert torch.equal(store.load_state("job-a").motion_latents, state(3, 3, seed=1).motion_latents)


def test_save_state_checks_segment_names(store):
    with pytest.raises(ValueError, match="1 segment names for 2 segments"):
        store.save_state("job-a", state(2, 2, seed=0), names(1))


@pytest.mark.parametrize("job_id", ["", ".", "..", "a/b", "..\\x"])
def test_job_ids_stay_inside_the_run(store, job_id):
    with pytest.raises(ValueError, match="plain file name"):
        store.load_state(job_id)


# --- segments -------------------------------------------------------------------------------------------


def test_segments_round_trip(store, tmp_path):
    rendered = tmp_path / "render"
    rendered.mkdir()
    local = []
    for i in range(3):
        local.append(rendered / f"segment-{i:05d}.mp4")
        local[-1].write_bytes(bytes([i]) * (1000 + i))

    uploaded = [store.put_segment("job-a", path) for path in local]
    assert uploaded == names(3)

    fetched = store.fetch_segments("job-a", list(reversed(uploaded)), tmp_path / "elsewhere" / "job-a")
    assert [p.name for p in fetched] == list(reversed(uploaded))
    for path in fetched:
        assert path.read_bytes() == (rendered / path.name).read_bytes()
    assert store.fetch_segments("job-a", [], tmp_path / "none") == []


# --- window log -----------------------------------------------------------------------------------------


def test_window_log_is_ordered_by_window_then_attempt(store):
    logged = [(2, 1), (0, 1), (1, 10), (1, 2), (1, 1)]
    for window, attempt in logged:
        store.append_window_log(
            "job-a",
            {
                "window": window,
                "attempt": attempt,
                "actor": f"renderer-{attempt}",
                "host": "node-1",
                "started": 1000.0 + window,
                "finished": 1060.0 + window,
                "seconds": 60.0,
            },
        )
    store.append_window_log("job-a", {"window": 0, "attempt": 1, "actor": "renderer-1", "seconds": 61.0})

    records = store.read_window_log("job-a")
    assert [(r["window"], r["attempt"]) for r in records] == [(0, 1), (1, 1), (1, 2), (1, 10), (2, 1)]
    assert records[0] == {"window": 0, "attempt": 1, "actor": "renderer-1", "seconds": 61.0}  # replaced
    assert records[1]["host"] == "node-1"
    assert store.read_window_log("job-b") == []


# --- results --------------------------------------------------------------------------------------------


def test_results_round_trip_with_nulls(store):
    assert store.read_results() == []
    finished = datetime.datetime(2025, 5, 1, 12, 30, tzinfo=datetime.UTC)
    rows = [
        {
            "id": "a",
            "status": "done",
            "error": None,
            "output": "out/a.mp4",
            "frames": 250,
            "duration": 10.0,
            "windows": 3,
            "seconds": 412.5,
            "actor": "renderer-0",
            "attempts": 1,
            "finished": finished,
        },
        {"id": "b", "status": "failed", "error": "audio: no such file 'b.wav'"},  # everything else null
    ]
    store.write_results(rows)

    read = store.read_results()
    assert read[0] == {name: None for name in RESULTS_SCHEMA.names} | rows[0]
    assert read[1] == {name: None for name in RESULTS_SCHEMA.names} | rows[1]

    data = store.fs.cat_file(f"{store.root}/results.parquet")
    assert pq.read_table(pa.BufferReader(data)).schema.equals(RESULTS_SCHEMA)
    assert RESULTS_SCHEMA.names[:9] == [
        "id",
        "status",
        "error",
        "output",
        "frames",
        "duration",
        "windows",
        "seconds",
        "actor",
    ]

    store.write_results(rows[1:])  # the whole table is replaced
    assert [r["id"] for r in store.read_results()] == ["b"]
    assert files(store) == ["results.parquet"]


def test_a_finished_row_writes_its_own_file_which_reads_over_the_table_until_compacted(store):
    """The cost of a finished row is one small file, whatever the table's size: results.parquet is not
    touched until write_results compacts the rows' files into it (and removes them)."""
    store.write_results([{"id": f"row-{i}", "status": "pending"} for i in range(1000)])
    table = store.fs.cat_file(f"{store.root}/results.parquet")
    store.put_result({"id": "row-7", "status": "done", "output": "outputs/row-7.mp4", "attempts": 1})
    store.put_result({"id": "late", "status": "failed", "error": "audio: no such file"})
    assert store.fs.cat_file(f"{store.root}/results.parquet") == table  # the table as it was
    assert len(store.fs.cat_file(f"{store.root}/results/row-7.parquet")) < 8000  # one row, whatever the table
    read = store.read_results()
    assert [r["id"] for r in read[:3]] == ["row-0", "row-1", "row-2"] and read[-1]["id"] == "late"  # order kept
    assert {r["id"]: r["status"] for r in read}["row-7"] == "done" and len(read) == 1001
    store.write_results(read)
    assert store.read_results() == read and files(store, "results") == []  # compacted: the row files gone
    with pytest.raises(ValueError, match="unknown columns"):
        store.put_result({"id": "x", "status": "done", "secnds": 1.0})


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"id": "a", "status": "done", "secnds": 1.0}], "unknown columns"),
        ([{"id": "a", "status": None}], "'status' is required"),
        ([{"id": "a", "status": "done"}, {"id": "a", "status": "failed"}], "appears twice"),
    ],
)
def test_results_reject_bad_rows(store, rows, message):
    with pytest.raises(ValueError, match=message):
        store.write_results(rows)
    assert store.read_results() == []


# --- outputs, config, clearing --------------------------------------------------------------------------


def test_publish_exposes_only_whole_outputs(store, tmp_path, monkeypatch):
    video = tmp_path / "final.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    seen = []
    mv = store.fs.mv

    def watching_mv(source, destination, **kwargs):
        # Just before the move: the upload is complete under a hidden name, the final name is absent.
        seen.append((store.output_exists("a.mp4"), files(store, "outputs")))
        assert store.fs.cat_file(source) == video.read_bytes()
        mv(source, destination, **kwargs)

    monkeypatch.setattr(store.fs, "mv", watching_mv)
    assert not store.output_exists("a.mp4")
    where = store.publish_output(video, "a.mp4")

    ((existed, listed),) = seen
    assert not existed and len(listed) == 1 and listed[0].startswith(".a.mp4.") and listed[0].endswith(".tmp")
    assert store.output_exists("a.mp4") and files(store, "outputs") == ["a.mp4"]
    assert where.endswith("/outputs/a.mp4")
    fs, path = fsspec.core.url_to_fs(where)  # the returned location is usable as it is
    assert fs.cat_file(path) == video.read_bytes()


def test_failed_upload_leaves_nothing_however_often_it_is_tried_again(store, tmp_path, monkeypatch):
    video = tmp_path / "final.mp4"
    video.write_bytes(b"x" * 10_000)
    tries = []

    def broken_put_file(local, remote, **kwargs):
        tries.append(remote)
        store.fs.pipe_file(remote, b"x" * 100)  # part of the upload landed
        raise ConnectionError("connection reset")

    monkeypatch.setattr(store.fs, "put_file", broken_put_file)
    monkeypatch.setattr(storage, "RETRY_SECONDS", 0.5)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.05,))
    with pytest.raises(ConnectionError):
        store.publish_output(video, "a.mp4")
    assert len(tries) > 2 and len(set(tries)) == len(tries)  # tried again, whole, each time to a new temporary
    assert not store.output_exists("a.mp4")
    assert files(store, "outputs") == []


def test_an_error_that_is_not_the_store_being_unreachable_is_not_tried_again(store, monkeypatch):
    tries = []

    def refused(*args, **kwargs):
        tries.append(args)
        raise PermissionError("access denied")

    monkeypatch.setattr(store.fs, "pipe_file", refused)
    with pytest.raises(PermissionError):
        store.save_config("model: tiny\n")
    assert len(tries) == 1


def test_config_is_the_latest_runs_and_every_runs_is_kept(store):
    store.save_config("model: tiny\n")
    store.save_config("model: full\n")
    assert store.read_config() == "model: full\n"
    kept = files(store, "configs")  # named by the time, so in the order saved
    assert [store.fs.cat_file(f"{store.root}/configs/{f}") for f in kept] == [b"model: tiny\n", b"model: full\n"]
    assert files(store) == sorted(["config.yaml", *kept])





def test_local_copies_fetch_remote_inputs_and_leave_local_ones(tmp_path):
    from farm.localize import is_remote, local_copies
    from pipeline.job import Job

    assert is_remote("s3://bucket/a.wav") and is_remote("memory://x/a.wav")
    assert not is_remote("/data/a.wav") and not is_remote("file:///data/a.wav") and not is_remote("local:///a.wav")
    remote = f"memory://talkfarm-test-{uuid.uuid4().hex}/speech.wav"
    with fsspec.open(remote, "wb") as f:
        f.write(b"RIFF-not-really")
    image = tmp_path / "face.png"
    image.write_bytes(b"png")
    job = Job(id="j", audio=(remote,), image=str(image))
    with local_copies(job) as local:
        assert local.image == str(image)
        copied = local.audio[0]
        assert not is_remote(copied) and copied.endswith(".wav")
        assert open(copied, "rb").read() == b"RIFF-not-really"
    assert not os.path.exists(copied)  # the copies go with the context
