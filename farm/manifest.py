"""Read a manifest of jobs and check every row before anything is scheduled.

A manifest is JSONL, CSV or Parquet (chosen by its suffix: .jsonl, .csv, .parquet), a local path or an
fsspec URL (s3://..., gs://..., memory://...). One row per job:

    id                 required, unique; names the job's state folder, so it must be a plain file name
                       of at most MAX_NAME_BYTES bytes (UTF-8), as must `output`
    image | video      exactly one: a face image, or a video to dub
    audio              the speech (audio_1 is another name for it) ...
    audio_2            ... and a second speaker's, for two speakers, with
      audio_type       "para" (they talk at once, the default) or "add" (speaker 1, then speaker 2)
      boxes            optional: each speaker's region [left, top, right, bottom] in source pixels, as
                       [[...], [...]]; a list in JSONL/Parquet, the same JSON as text in CSV
    prompt, negative_prompt, seed (default 0)
    output             plain file name in the run's output folder, ending in .mp4 (default <id>.mp4)
    steps, scheduler, shift, text_scale, audio_scale, color_match, color_strength
                       per-row overrides of the run's RenderSettings; no other setting can be overridden

Rules, the same in every format:
- An empty value (missing key, null, NaN, empty string, empty CSV cell) means "not given".
- An unknown column fails the rows that give it a value, with a reason naming it: the farm must not
  silently ignore a setting (a misspelt "stpes" would otherwise render with the default steps), while
  rows that leave it empty, e.g. in a CSV where only some rows use it, still run.
- Media paths are fsspec URLs (used as given; file:// ones become plain paths), absolute local paths, or
  relative to the manifest's folder, also when the manifest is at a URL (s3://b/jobs/m.csv + face.png
  -> s3://b/jobs/face.png). A manifest's paths must lie in the manifest's folder, the run's object store
  or a location of inputs.allow (farm/inputs.py); the rest are refused before anything reads them.
- Local media are probed with ffmpeg (pipeline.media.probe): audio must have an audio stream at least
  one wav2vec2 window long, an image or video a picture at least MIN_SIDE pixels on each side, boxes must
  lie inside it. Remote media are only checked to exist: probing them would mean downloading every input
  before the first job starts; the renderer's own reads catch the rest.
- A row's `row` is its 1-based position among the manifest's rows (JSONL: blank lines are not rows).

A bad row becomes a RowError with every problem found in it, joined in one line; the good rows run.
A manifest that cannot be read at all raises ManifestError.
"""

import dataclasses
import difflib
import io
import json
import math
import os
import posixpath
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from farm.inputs import InputLocations, input_locations, is_url, local_form
from pipeline import media
from pipeline.job import MIN_AUDIO_SAMPLES, SAMPLE_RATE, Box, Job, JobError, RenderSettings, SettingError


class ManifestError(ValueError):
    """The manifest itself cannot be read: `<location>: <problem>`."""

    def __init__(self, location: str, problem: str):
        super().__init__(f"{location}: {problem}")


@dataclass(frozen=True)
class ManifestRow:
    row: int  # 1-based position in the manifest
    job: Job
    output: str  # file name in the run's output folder
    overrides: dict  # the RenderSettings fields this row changes
    speech_seconds: float | None = None  # the job's timeline (its tracks arranged); None: remote audio, not probed


@dataclass(frozen=True)
class RowError:
    row: int
    id: str | None  # None when the row has no usable id
    reason: str  # one line: every problem in the row, each naming its column


def read_manifest(location: str, base: RenderSettings, *, allow: Sequence[str] = (),
                  storage_root: str = "") -> tuple[list[ManifestRow], list[RowError]]:
    """The jobs of a manifest and the rows that cannot run. `base` is the run's settings: the overrides are
    checked in combination with them (scheduler=flowmatch_distill needs steps=4, from the row or the run).
    Media may be read from the manifest's folder, the object store of `storage_root` and `allow`."""
    base_dir = _directory(location)
    return _check_rows(_read_records(location), base_dir, base, input_locations(base_dir, storage_root, list(allow)))


def single_job(fields: dict, base_dir: str, base: RenderSettings) -> tuple[list[ManifestRow], list[RowError]]:
    """One job given as manifest columns (e.g. on the command line), relative paths against `base_dir`:
    checked exactly as a one-row manifest, except that its paths may be anywhere: the operator typed them.
    Without an id it is named after its audio file's stem, as farm.config.run_root names its run."""
    audio = fields.get("audio") or fields.get("audio_1")
    if _empty(fields.get("id")) and isinstance(audio, str):
        fields = {**fields, "id": PurePosixPath(urlsplit(audio).path).stem}
    return _check_rows([fields], base_dir, base, None)


def settings_for(row: ManifestRow, base: RenderSettings) -> RenderSettings:
    """The settings `row` renders with: `base` (the one its manifest was checked against) plus its overrides."""
    return dataclasses.replace(base, **row.overrides)


# --------------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------------


def _read_records(location: str) -> list[dict]:
    readers = {".jsonl": _jsonl_records, ".csv": _csv_records, ".parquet": _parquet_records}
    suffix = posixpath.splitext(location)[1].lower()
    if suffix not in readers:
        raise ManifestError(location, f"unknown manifest format {suffix or '(no suffix)'!r}; "
                                      f"use {', '.join(readers)}")
    try:
        with fsspec.open(location, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ManifestError(location, "no such file") from None
    except (OSError, ImportError, ValueError) as e:  # a directory, a missing fsspec backend, a bad URL
        raise ManifestError(location, f"cannot read it ({e})") from None
    return readers[suffix](data, location)


def _jsonl_records(data: bytes, location: str) -> list[dict]:
    try:
        text = data.decode("utf-8-sig")  # some Windows editors start the file with a byte-order mark
    except UnicodeDecodeError as e:
        raise ManifestError(location, f"not UTF-8 text ({e})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(location, f"line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise ManifestError(location, f"line {number}: expected one JSON object {{...}} per line")
        records.append(record)
    return records


def _csv_records(data: bytes, location: str) -> list[dict]:
    try:
        names = pa_csv.open_csv(io.BytesIO(data)).schema.names
        # Every column as text, converted per row: type inference would turn the id "007" into 7, and one
        # bad cell would change the type of its whole column.
        convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                        strings_can_be_null=True, null_values=[""])
        table = pa_csv.read_csv(io.BytesIO(data), convert_options=convert)
    except pa.ArrowInvalid as e:
        raise ManifestError(location, f"not a readable CSV file ({e})") from None
    return _table_records(table, location)


def _parquet_records(data: bytes, location: str) -> list[dict]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except pa.ArrowInvalid as e:
        raise ManifestError(location, f"not a readable Parquet file ({e})") from None
    # pandas stores a DataFrame's index as a column unless it is 0, 1, 2, ... (e.g. after filtering rows);
    # it is bookkeeping, not a job field.
    index = [c for c in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
    return _table_records(table.drop_columns(index), location)


def _table_records(table: pa.Table, location: str) -> list[dict]:
    names = table.schema.names
    repeated = [name for name in names if names.count(name) > 1]
    if repeated:
        positions = [str(i) for i, name in enumerate(names, 1) if name == repeated[0]]
        raise ManifestError(location, f"column {repeated[0]!r}: appears more than once (columns "
                                      f"{', '.join(positions)})")
    return table.to_pylist()


# --------------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------------


def _directory(location: str) -> str:
    location = local_form(location)
    if is_url(location):
        protocol, rest = location.split("://", 1)
        return f"{protocol}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(location))


def _resolve(path: str, base_dir: str) -> str:
    if is_url(path):
        return local_form(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    if is_url(base_dir):
        protocol, root = base_dir.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(root, path))}"
    return os.path.normpath(os.path.join(base_dir, path))


# --------------------------------------------------------------------------------------------------------
# Values: each converter returns the value or raises _Invalid, whose message names the column
# --------------------------------------------------------------------------------------------------------


class _Invalid(ValueError):
    pass


def _empty(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{column}: expected text, got {value!r}")
    return value


def _integer(value, column: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():  # pandas writes an integer column with gaps as floats
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(f"{column}: expected a whole number, got {value!r}")


def _number(value, column: str) -> float:
    number = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise _Invalid(f"{column}: expected a finite number, got {value!r}")
    return number


# The longest id or output, in bytes of UTF-8: file systems (ext4, XFS, btrfs, APFS) allow 255-byte names, and
# the longest names the farm derives from them are the published output's temporary file (farm.storage),
# `.<id>.mp4.<12-hex token>.tmp` by default (22 bytes more than the id) or `.<output>.<token>.tmp` (18 more);
# 200 leaves room for those and a margin. Refused here, a long id costs nothing; once scheduled it failed
# every retry with "File name too long".
MAX_NAME_BYTES = 200


def _file_name(value, column: str) -> str:
    """A plain file name: the run's storage keeps a job's state and its output under these names."""
    name = _text(value, column)
    if name in (".", "..") or any(c in "/\\" or not c.isprintable() for c in name):
        raise _Invalid(f"{column}: {name!r} must be a plain file name (no '/', '\\' or control characters, "
                       f"not '.' or '..')")
    if (size := len(name.encode())) > MAX_NAME_BYTES:  # the name itself is left out: it would swamp the reason
        raise _Invalid(f"{column}: {size} bytes is longer than the {MAX_NAME_BYTES} allowed (it becomes a file "
                       f"name)")
    return name


def _job_id(value, column: str) -> str:
    return _file_name(str(value) if isinstance(value, int) and not isinstance(value, bool) else value, column)


def _boxes(value, column: str) -> tuple[Box, ...]:
    boxes = value
    if isinstance(value, str):
        try:
            boxes = json.loads(value)
        except json.JSONDecodeError:
            boxes = None
    numbers = (int, float)
    if not (isinstance(boxes, list) and all(
            isinstance(box, list) and len(box) == 4 and all(
                isinstance(x, numbers) and not isinstance(x, bool) and math.isfinite(x) for x in box)
            for box in boxes)):
        raise _Invalid(f"{column}: expected [[left, top, right, bottom], [left, top, right, bottom]] in source "
                       f"pixels, got {value!r}")
    return tuple(Box(*map(float, box)) for box in boxes)


def _output(value, column: str) -> str:
    name = _file_name(value, column)
    if not name.lower().endswith(".mp4"):
        raise _Invalid(f"{column}: {name!r} must end in .mp4 (the farm writes H.264/AAC MP4)")
    return name


OVERRIDES = {"steps": _integer, "scheduler": _text, "shift": _number, "text_scale": _number,
             "audio_scale": _number, "color_match": _text, "color_strength": _number}
_SOURCES = ("image", "video")
_AUDIO = ("audio", "audio_1", "audio_2")
COLUMNS = ("id", *_SOURCES, *_AUDIO, "audio_type", "boxes", "prompt", "negative_prompt", "seed", "output",
           *OVERRIDES)


def _settings_problems(base: RenderSettings, overrides: dict) -> list[str]:
    """What RenderSettings says of the run's settings with these overrides, each problem naming the column.
    `base` is valid (it checked itself), so a refusal is the row's doing: a refused column is set aside
    and the rest tried again, so that every bad override is reported; a field the row does not set is
    refused in the company of its columns (scheduler=flowmatch_distill with the run's 40 steps)."""
    problems, rest = [], dict(overrides)
    while True:
        try:
            dataclasses.replace(base, **rest)
            return problems
        except SettingError as e:
            if e.field not in rest:
                problems.append(f"{', '.join(rest)}: {e.problem} (the run's {e.field})")
                return problems
            problems.append(str(e))
            del rest[e.field]


# --------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Draft:
    """A row on its way to a ManifestRow: what has parsed so far and every problem found."""

    row: int
    id: str | None = None
    job: Job | None = None
    media: dict[str, str] = field(default_factory=dict)  # column -> resolved path
    output: str | None = None
    overrides: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    speech_seconds: float | None = None

    def take(self, values: dict, column: str, convert):
        """values[column] converted, or None if it is not given or does not convert (the reason noted)."""
        if column not in values:
            return None
        try:
            return convert(values[column], column)
        except _Invalid as e:
            self.reasons.append(str(e))
            return None


def _check_rows(records: list[dict], base_dir: str, base: RenderSettings,
                locations: InputLocations | None) -> tuple[list[ManifestRow], list[RowError]]:
    """`locations`: where media may be read from; None: anywhere."""
    drafts = [_parse(row, record, base_dir, base, locations) for row, record in enumerate(records, 1)]
    _mark_duplicates(drafts)
    _check_media(drafts)
    rows = [ManifestRow(d.row, d.job, d.output, d.overrides, d.speech_seconds) for d in drafts if not d.reasons]
    errors = [RowError(d.row, d.id, "; ".join(d.reasons)) for d in drafts if d.reasons]
    return rows, errors


def _parse(row: int, record: dict, base_dir: str, base: RenderSettings, locations: InputLocations | None) -> _Draft:
    values = {column: value for column, value in record.items() if not _empty(value)}
    draft = _Draft(row)
    draft.id = draft.take(values, "id", _job_id)
    if "id" not in values:
        draft.reasons.append("id: missing")

    sources = [column for column in _SOURCES if column in values]
    if len(sources) != 1:
        draft.reasons.append(f"image, video: give exactly one ({'both' if sources else 'neither'} given)")
    speakers = [column for column in _AUDIO if column in values]
    if problem := _speakers_problem(speakers):
        draft.reasons.append(problem)
    for column in sources + speakers:
        if (path := draft.take(values, column, _text)) is not None:
            path = _resolve(path, base_dir)
            if locations is not None and (problem := locations.problem(path)):
                draft.reasons.append(f"{column} {path}: {problem}")  # refused before anything reads or fetches it
            else:
                draft.media[column] = path
    job_fields = {name: value for name, convert in (("prompt", _text), ("negative_prompt", _text),
                                                    ("seed", _integer), ("audio_type", _text), ("boxes", _boxes))
                  if (value := draft.take(values, name, convert)) is not None}
    if not draft.reasons:  # the Job's own checks (seed range, audio_type, boxes per speaker) need valid fields
        try:
            draft.job = Job(id=draft.id, image=draft.media.get("image"), video=draft.media.get("video"),
                            audio=tuple(draft.media[c] for c in speakers), **job_fields)
        except JobError as e:
            draft.reasons.append(str(e))

    draft.output = draft.take(values, "output", _output) or (draft.id and f"{draft.id}.mp4")
    for column, convert in OVERRIDES.items():
        if (value := draft.take(values, column, convert)) is not None:
            draft.overrides[column] = value
    draft.reasons += _settings_problems(base, draft.overrides)
    draft.reasons += [_unknown(column) for column in sorted(values.keys() - set(COLUMNS))]
    return draft


def _unknown(column: str) -> str:
    close = difflib.get_close_matches(column, COLUMNS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known columns: {', '.join(COLUMNS)}"
    return f"unknown column {column!r}; {hint}"


def _speakers_problem(given: list[str]) -> str | None:
    """None if the audio columns `given` are one or two speakers: audio or audio_1, then maybe audio_2."""
    if "audio" in given and "audio_1" in given:
        return "audio, audio_1: both name speaker 1's track; give one of them"
    if "audio" not in given and "audio_1" not in given:
        return "audio: missing" + (" (audio_2 is the second speaker; the first is audio or audio_1)"
                                   if given else "")
    return None


def _mark_duplicates(drafts: list[_Draft]) -> None:
    """Every row of an id that several rows share fails, naming the others: which one the user meant is
    theirs to say. A repeat of an output after its first row fails too (a shared id also shares the
    default output, so only the id is reported then)."""
    rows_of: dict[str, list[int]] = {}
    for draft in drafts:
        if draft.id is not None:
            rows_of.setdefault(draft.id, []).append(draft.row)
    first_output: dict[str, int] = {}
    for draft in drafts:
        others = [row for row in rows_of.get(draft.id, []) if row != draft.row]
        if others:
            draft.reasons.append(f"id: {draft.id!r} is also the id of row{'s' * (len(others) > 1)} "
                                 f"{', '.join(map(str, others))}")
        elif draft.output is not None and draft.output in first_output:
            draft.reasons.append(f"output: {draft.output!r} is also the output of row {first_output[draft.output]}")
        if draft.output is not None:
            first_output.setdefault(draft.output, draft.row)


# --------------------------------------------------------------------------------------------------------
# Media files
# --------------------------------------------------------------------------------------------------------


def _check_media(drafts: list[_Draft]) -> None:
    # Each file once, however many rows share it (a batch often reuses one face or one voice), in a thread
    # pool: a probe is a few short ffmpeg runs, a remote check one round trip, so threads overlap well.
    paths = sorted({path for draft in drafts for path in draft.media.values()})
    with ThreadPoolExecutor() as pool:
        found = dict(zip(paths, pool.map(_inspect, paths)))
    for draft in drafts:
        for column, path in draft.media.items():
            info, problem = found[path]
            if problem is None and info is not None:
                problem = _stream_problem(column, info)
            if problem:
                draft.reasons.append(f"{column} {path}: {problem}")
        if draft.job is not None and draft.job.boxes:
            _check_boxes(draft, found[draft.job.image or draft.job.video][0])
        tracks = [found[path][0] for path in (draft.job.audio if draft.job else ())]
        if tracks and all(info is not None and info.has_audio for info in tracks):
            seconds = [info.audio.duration for info in tracks]  # as pipeline.speakers arranges them
            draft.speech_seconds = sum(seconds) if draft.job.audio_type == "add" else max(seconds)


def _check_boxes(draft: _Draft, source: media.MediaInfo | None) -> None:
    """The speakers' boxes against the picture's size, where it is known (local files only)."""
    if source is None:
        return
    height, width = source.frame_size()
    for i, box in enumerate(draft.job.boxes):
        try:
            box.check(width, height, f"boxes: speaker {i + 1}")
        except JobError as e:
            draft.reasons.append(str(e))


def _inspect(path: str) -> tuple[media.MediaInfo | None, str | None]:
    """(info, None) for a local file ffmpeg reads; (None, None) for a remote file that exists;
    (None, problem) otherwise."""
    if not is_url(path):
        try:
            return media.probe(path), None
        except media.MediaError as e:
            return None, e.problem
    try:
        filesystem, inner = fsspec.core.url_to_fs(path)
        return None, None if filesystem.isfile(inner) else "no such file"
    # A missing fsspec backend, credentials, the network: whatever the cause, the row cannot run as it is.
    except Exception as e:  # noqa: BLE001
        return None, f"cannot check it ({type(e).__name__}: {e})"


# The smallest image or video accepted, in pixels on each side. Any source is resized to cover the output
# size (320 px or more a side in the 480p buckets) and CLIP sees it at 224x224, so a 64 px side is already
# upscaled 3.5-5x: a smaller one renders without an error, but as a blur, after all the job's GPU time (it
# is mostly a thumbnail or placeholder given by mistake). 64 px is also 4 latent patches (VAE /8, DiT /2).
MIN_SIDE = 64


def _stream_problem(column: str, info: media.MediaInfo) -> str | None:
    if column in _AUDIO:
        if not info.has_audio:
            return "no audio stream"
        if info.audio.sample_count == 0:
            return "the audio is empty"
        # As resampled for the encoder; shorter fails the encoder on every retry alike.
        if info.audio.duration * SAMPLE_RATE < MIN_AUDIO_SAMPLES:
            return (f"{info.audio.duration:.3f} s of audio is shorter than wav2vec2's {MIN_AUDIO_SAMPLES}-sample "
                    f"window ({MIN_AUDIO_SAMPLES / SAMPLE_RATE * 1000:g} ms at "
                    f"{SAMPLE_RATE / 1000:g} kHz)")
    elif not info.has_video:
        return "no picture in it (ffmpeg finds no image or video stream)"
    elif min(info.frame_size()) < MIN_SIDE:
        height, width = info.frame_size()
        return f"{width}x{height} is smaller than the minimum {MIN_SIDE}x{MIN_SIDE}"
    return None
