"""A run's durable state, through fsspec: a local path by default, or any fsspec URL (s3://, gs://,
memory://, file://) - the same code for all of them.

    <root>/driver.json                              the lease of the driver running now (farm/driver_lease.py)
    <root>/config.yaml                              the resolved config of the latest run ...
    <root>/configs/<UTC start time>.yaml            ... and of every run, kept
    <root>/logs/<UTC start time>.log                every run's log (farm.runlog)
    <root>/results.parquet                          one row per job (RESULTS_SCHEMA), compacted now and then ...
    <root>/results/<job_id>.parquet                 ... from each row's own file, written as the row ends
    <root>/jobs/<job_id>/state.json                 resume state after the job's last finished window ...
    <root>/jobs/<job_id>/state-00004-<token>.safetensors   ... and its motion latents (named in state.json)
    <root>/jobs/<job_id>/segment-00003.mp4          each window's kept frames
    <root>/jobs/<job_id>/windows/00003-attempt1.json   the window log, one object per rendered window
    <root>/outputs/<name>.mp4                       published videos

Every write goes to a hidden temporary name in the destination's directory (`.<name>.<token>.tmp`) and
is then moved into place, so a reader sees the old file or the new one, never half of one: a rename on
a local disk; on object stores a single PUT is already all-or-nothing and `mv` is a server-side copy, so
the same code is safe there too. A writer that dies leaves at most a temporary file, which no reader
looks at.

One writer per job at a time (the scheduler's job-to-actor affinity); any number of readers. An operation
that cannot reach the store (a server restarting, the network) is tried again, whole, for up to
RETRY_SECONDS with growing pauses; any other error is raised at once.
"""

import contextlib
import functools
import itertools
import json
import logging
import posixpath
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
from fsspec.implementations.local import LocalFileSystem

from farm.timings import STAGES
from pipeline.job import ResumeState

log = logging.getLogger(__name__)


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a store raises while it cannot be reached: the OS's connection errors and timeouts, aiohttp's
    (gcsfs, adlfs) and botocore's (s3fs: not OSErrors), where those are installed."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errors.append(aiohttp.ClientConnectionError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        errors.append(botocore.exceptions.ConnectionError)
    return tuple(errors)


UNREACHABLE = _unreachable_errors()
RETRY_SECONDS = 120  # a store operation that cannot reach the store is tried again for this long ...
RETRY_DELAYS = (1, 2, 4, 8, 16)  # ... after these pauses, then every 16 s


def _retried(operation):
    """Run a RunStore operation again, whole, while the store cannot be reached, for up to RETRY_SECONDS.
    Every operation is safe to repeat: each write goes to a fresh temporary name and is moved into place."""

    @functools.wraps(operation)
    def retrying(self, *args, **kwargs):
        deadline = time.monotonic() + RETRY_SECONDS
        for attempt in itertools.count(1):
            try:
                return operation(self, *args, **kwargs)
            except UNREACHABLE as error:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS)) - 1]
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: %s (%s); trying again in %d s", self.url, operation.__name__, error, delay)
                time.sleep(delay)

    return retrying

RESULTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        # done / failed / interrupted (Ctrl-C while it rendered: a re-run resumes it) / pending (not rendered yet)
        ("status", pa.string()),
        ("error", pa.string()),  # the one-line reason a row failed, for the user to act on
        ("output", pa.string()),  # where the published mp4 is (publish_output's return value)
        ("frames", pa.int64()),  # video frames, 25 fps
        ("duration", pa.float64()),  # seconds of video (= of speech)
        ("windows", pa.int64()),
        ("seconds", pa.float64()),  # wall time from the job's start on a renderer to its end, summed over runs
        ("actor", pa.string()),  # the actor that finished the job
        ("attempts", pa.int64()),  # over all runs; > 1 when the job was resumed or retried: worth a look
        ("finished", pa.timestamp("ms", tz="UTC")),  # when the row reached its status (parquet has no "s" unit)
        ("next_window", pa.int64()),  # an interrupted row: the window a re-run starts at
        # A failed row: whether running it again can help. false: the same inputs and settings fail the
        # same way (a re-run skips it unless retry_failed=true); true: a retry might get past it (I/O, out
        # of memory, a lost worker), its retries used up. Null for a row that failed the manifest's checks,
        # which every run makes again.
        ("retryable", pa.bool_()),
        # Done rows, from the window log (farm/timings.py): seconds per stage over every window rendered,
        # in every run; the device's stages sum to at most render_seconds (the rest is the loop's own work;
        # segment and store run beside the device's next window).
        ("encode_seconds", pa.float64()),  # T5, CLIP and wav2vec2 on the encoder (the last encode)
        ("render_seconds", pa.float64()),
        ("first_window_seconds", pa.float64()),
        *((f"{stage}_seconds", pa.float64()) for stage in STAGES),
        ("finish_seconds", pa.float64()),  # concatenation, mux, verification, upload
        ("device_seconds_per_video_second", pa.float64()),  # GPU-seconds per second of video on GPUs
        # What the row's stored windows and output were made from, as JSON {part: digest} (farm/fingerprint.py)
        ("fingerprint", pa.string()),
    ]
)
REQUIRED_COLUMNS = ("id", "status")


def missing_backend(url: str) -> str | None:
    """Why fsspec cannot open `url` here (the backend package of its protocol is not installed), or None."""
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol is None:
        return None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        return (f"the fsspec backend for {protocol}:// is not installed ({exc}); pip install 'talkfarm[cloud]' "
                "installs those of S3, Google Cloud Storage and Azure")
    except ValueError:  # a protocol fsspec does not know at all
        return f"fsspec knows no protocol {protocol}://"
    return None


class RunStore:
    """The files of one run under `root`; see the module docstring for the layout."""

    def __init__(self, root: str):
        self.url = root  # as given: what other processes open their own RunStore with
        self.fs, self.root = fsspec.core.url_to_fs(root)

    @property
    def results_path(self) -> str:
        return self._location(self._path("results.parquet"))

    # ------------------------------------------------------------------------------------ the run

    @_retried
    def read_config(self) -> str | None:
        """The config.yaml an earlier run wrote, or None."""
        data = self._read(self._path("config.yaml"))
        return None if data is None else data.decode()

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @_retried
    def read_driver_lease(self) -> dict | None:
        """The lease the driver of this run root holds (farm/driver_lease.py), or None."""
        data = self._read(self._path("driver.json"))
        return None if data is None else json.loads(data)

    @_retried
    def write_driver_lease(self, lease: dict) -> None:
        self._write(self._path("driver.json"), json.dumps(lease).encode())

    @_retried
    def remove_driver_lease(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path("driver.json"))

    @_retried
    def save_config(self, text: str) -> str:
        """config.yaml, the latest run's, and a copy under configs/ named by the time (UTC) it was saved:
        the run's stamp, returned, which also names its log."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S.%fZ")
        self._write(self._path("configs", f"{stamp}.yaml"), text.encode())
        self._write(self._path("config.yaml"), text.encode())
        return stamp

    def log_path(self, stamp: str) -> str:
        """Where the log of the run `stamp` is (a path for a local root, a URL otherwise)."""
        return self._location(self._path("logs", f"{stamp}.log"))

    def local_log(self, stamp: str) -> Path | None:
        """The log's own file on a local root (its folder made), to append to as the run goes; None on
        an object store, where it is put whole (put_log)."""
        if not self.is_local:
            return None
        path = Path(self.log_path(stamp))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @_retried
    def put_log(self, local_path: str | Path, stamp: str) -> None:
        self._upload(local_path, self._path("logs", f"{stamp}.log"))

    @_retried
    def write_results(self, rows: list[dict]) -> None:
        """Replace the results table with `rows` (dicts keyed by RESULTS_SCHEMA's columns; a missing
        column is null), and remove the rows' own files (put_result), which it now holds. One writer
        (the driver) writes both, so no row file can appear between the table and the removal."""
        ids = set()
        for row in rows:
            _check_result(row)
            if row["id"] in ids:
                raise ValueError(f"results: job id {row['id']!r} appears twice")
            ids.add(row["id"])
        self._write(self._path("results.parquet"), _parquet(rows))
        for name in self._list(self._path("results")):
            if name.endswith(".parquet"):
                self.fs.rm(self._path("results", name))

    @_retried
    def put_result(self, row: dict) -> None:
        """One row's results as a file of its own: the cost of a finished row, whatever the table's size.
        read_results reads them over the table until write_results compacts them into it."""
        _check_result(row)
        self._write(self._path("results", f"{_component('job id', row['id'])}.parquet"), _parquet([row]))

    @_retried
    def read_results(self) -> list[dict]:
        """The results table as dicts (None for nulls), each row replaced by its own file where it has a
        newer one (a row not in the table yet comes after it); empty before the first write."""
        data = self._read(self._path("results.parquet"))
        rows = {} if data is None else {r["id"]: r for r in pq.read_table(pa.BufferReader(data)).to_pylist()}
        directory = self._path("results")
        paths = [f"{directory}/{name}" for name in self._list(directory) if name.endswith(".parquet")]
        for blob in (self.fs.cat(paths).values() if paths else ()):
            row = pq.read_table(pa.BufferReader(blob)).to_pylist()[0]
            rows[row["id"]] = row
        return list(rows.values())

    @_retried
    def publish_output(self, local_path: str | Path, name: str) -> str:
        """Upload a finished video as outputs/<name>, replacing any earlier one; returns where it is
        (a local path, or a URL). The caller verifies the local file first."""
        path = self._path("outputs", _component("output name", name))
        self._upload(local_path, path)
        return self._location(path)

    @_retried
    def output_exists(self, name: str) -> bool:
        path = self._path("outputs", _component("output name", name))
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

    # -------------------------------------------------------------------------------- one job

    @_retried
    def save_state(self, job_id: str, state: ResumeState, segment_names: list[str]) -> None:
        """Record `state` as the job's resume point. `segment_names` are the put_segment names of
        `state.segments`, in order; they must already be uploaded.

        The pair stays consistent: the tensor goes to a fresh name first, then state.json - the one
        file readers trust - is replaced to point at it. Dying between the two leaves the previous
        state.json and the tensor it names untouched.
        """
        if len(segment_names) != len(state.segments):
            raise ValueError(f"job {job_id!r}: {len(segment_names)} segment names for {len(state.segments)} segments")
        job = self._job_dir(job_id)
        tensor = None
        if state.motion_latents is not None:
            # Fresh per save, so even a repeated save of the same window never overwrites the tensor
            # that the current state.json names.
            tensor = f"state-{state.next_window:05d}-{uuid.uuid4().hex[:8]}.safetensors"
            latents = state.motion_latents.detach().cpu().contiguous()
            self._write(f"{job}/{tensor}", safetensors.torch.save({"motion_latents": latents}))
        record = {"next_window": state.next_window, "motion_latents": tensor, "segments": list(segment_names)}
        self._write(f"{job}/state.json", json.dumps(record, indent=1).encode())
        # Only now is the previous tensor unreferenced; this also sweeps tensors left by a writer that
        # died before its state.json was written.
        for name in self._list(job):
            if name.startswith("state-") and name.endswith(".safetensors") and name != tensor:
                self.fs.rm(f"{job}/{name}")

    @_retried
    def load_state(self, job_id: str) -> ResumeState | None:
        """The job's resume point, or None if it has none (never started, or cleared). Its segments
        are names in the job's directory: fetch_segments turns them into local files."""
        record = self._state_record(job_id)
        if record is None:
            return None
        latents = None
        if record["motion_latents"] is not None:
            tensors = safetensors.torch.load(self.fs.cat_file(f"{self._job_dir(job_id)}/{record['motion_latents']}"))
            latents = tensors["motion_latents"]
        return ResumeState(record["next_window"], latents, record["segments"])

    @_retried
    def next_window(self, job_id: str) -> int:
        """The window the job resumes at (0: none stored), from state.json alone: no latents fetched."""
        record = self._state_record(job_id)
        return 0 if record is None else record["next_window"]

    def _state_record(self, job_id: str) -> dict | None:
        data = self._read(f"{self._job_dir(job_id)}/state.json")
        return None if data is None else json.loads(data)

    @_retried
    def clear_job(self, job_id: str) -> None:
        """Remove the job's state, stored windows and window log, so that it renders from nothing. Its
        published output stays until a new one replaces it."""
        job = self._job_dir(job_id)
        self.fs.invalidate_cache(job)
        if self.fs.exists(job):
            self.fs.rm(job, recursive=True)

    @_retried
    def clear_windows(self, job_id: str) -> None:
        """Remove a finished job's resume state and segments, keeping its window log: the published
        video holds them all. state.json goes first, so that no state ever names a missing segment."""
        job = self._job_dir(job_id)
        names = self._list(job)
        for name in sorted(names, key=lambda n: n != "state.json"):
            if name != "windows":
                self.fs.rm(f"{job}/{name}")

    @_retried
    def put_segment(self, job_id: str, local_path: str | Path) -> str:
        """Upload a window's segment into the job's directory under its file name; returns that name."""
        name = _component("segment name", Path(local_path).name)
        self._upload(local_path, f"{self._job_dir(job_id)}/{name}")
        return name

    @_retried
    def fetch_segments(self, job_id: str, names: list[str], local_dir: str | Path) -> list[Path]:
        """Download the named segments into `local_dir` (created if needed); returns their paths in
        the order given."""
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        job = self._job_dir(job_id)
        paths = [local_dir / _component("segment name", name) for name in names]
        if names:  # one call, so filesystems that can download concurrently do
            self.fs.get([f"{job}/{name}" for name in names], [str(path) for path in paths])
        return paths

    @_retried
    def append_window_log(self, job_id: str, record: dict) -> None:
        """Add a record (JSON-serialisable, with int `window` and `attempt`) to the job's window log.

        Object stores cannot append, and read-modify-write of one shared file would lose records to a
        crash or race, so each record is its own small object, windows/<window>-attempt<attempt>.json;
        re-logging the same window and attempt replaces its record.
        """
        name = f"{record['window']:05d}-attempt{record['attempt']}.json"
        self._write(f"{self._job_dir(job_id)}/windows/{name}", json.dumps(record).encode())

    @_retried
    def read_window_log(self, job_id: str) -> list[dict]:
        """All of the job's window records, ordered by (window, attempt)."""
        log_dir = f"{self._job_dir(job_id)}/windows"
        paths = [f"{log_dir}/{name}" for name in self._list(log_dir) if name.endswith(".json")]
        records = [json.loads(data) for data in self.fs.cat(paths).values()] if paths else []
        return sorted(records, key=lambda r: (r["window"], r["attempt"]))

    # ----------------------------------------------------------------------------------- helpers

    def _location(self, path: str) -> str:
        """A path for a local root, a URL otherwise."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _job_dir(self, job_id: str) -> str:
        return self._path("jobs", _component("job id", job_id))

    def _temporary(self, path: str) -> str:
        """A hidden name beside `path`: same directory (a rename never crosses filesystems), a suffix no
        reader matches, a token so concurrent writers never share it."""
        directory, name = posixpath.split(path)
        return f"{directory}/.{name}.{uuid.uuid4().hex[:12]}.tmp"

    def _write(self, path: str, data: bytes) -> None:
        self._into_place(path, lambda temporary: self.fs.pipe_file(temporary, data))

    def _upload(self, local_path: str | Path, path: str) -> None:
        self._into_place(path, lambda temporary: self.fs.put_file(str(local_path), temporary))

    def _into_place(self, path: str, write) -> None:
        if self.is_local:  # object stores have no directories to create
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = self._temporary(path)
        try:
            write(temporary)
            self.fs.mv(temporary, path)
        except Exception:
            if self.fs.exists(temporary):  # a failed upload should not leave debris on every retry
                self.fs.rm(temporary)
            raise

    def _read(self, path: str) -> bytes | None:
        # cat_file rather than open(): it fetches the object as it is now, where s3fs's open() may
        # size its reads from cached listing info that another process has since made stale.
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _list(self, directory: str) -> list[str]:
        """File names in `directory` as they are now (other processes write here: drop cached listings)."""
        self.fs.invalidate_cache(directory)
        try:
            return [posixpath.basename(p) for p in self.fs.ls(directory, detail=False)]
        except FileNotFoundError:
            return []


def _check_result(row: dict) -> None:
    unknown = row.keys() - set(RESULTS_SCHEMA.names)
    if unknown:  # a misspelt column would otherwise be dropped without a word
        raise ValueError(f"results row {row.get('id')!r}: unknown columns {sorted(unknown)}")
    for column in REQUIRED_COLUMNS:
        if row.get(column) is None:
            raise ValueError(f"results row {row}: {column!r} is required")


def _parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


def _component(what: str, name: str) -> str:
    """`name` if it is one plain path component; ids and names come from manifests, and must never
    reach outside their directory."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} must be a plain file name (no '/', not '.' or '..')")
    return name
