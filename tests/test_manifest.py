"""farm.manifest: reading JSONL/CSV/Parquet manifests and checking every row, on small media made here."""

import csv
import functools
import http.server
import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from farm.manifest import ManifestError, read_manifest, settings_for, single_job
from pipeline import media
from pipeline.job import Box, RenderSettings

BASE = RenderSettings()
REPO = Path(__file__).resolve().parents[1]


def ffmpeg(*args: str) -> None:
    subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """face.png, speech.wav, talk.mp4 (video + audio), silent.mp4 (no audio), notes.wav (text); the pictures
    are 64x64, the minimum size."""
    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), (200, 150, 120)).save(d / "face.png")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=16000:duration=0.5", str(d / "speech.wav"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25:duration=0.4", "-f", "lavfi", "-i",
           "sine=frequency=330:sample_rate=16000:duration=0.4", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-c:a", "aac", str(d / "talk.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25:duration=0.4", "-c:v", "libx264",
           str(d / "silent.mp4"))
    (d / "notes.wav").write_text("not audio at all\n")
    return d


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def as_table(records: list[dict]) -> list[dict]:
    """The records with boxes as JSON text, as CSV and Parquet carry them."""
    return [{k: json.dumps(v) if k == "boxes" else v for k, v in record.items()} for record in records]


def write_csv(path: Path, records: list[dict]) -> str:
    columns = list(dict.fromkeys(k for record in records for k in record))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(as_table(records))
    return str(path)


def write_parquet(path: Path, records: list[dict]) -> str:
    columns = list(dict.fromkeys(k for record in records for k in record))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in as_table(records)]), path)
    return str(path)


def reasons(errors) -> dict[str, str]:
    return {error.id: error.reason for error in errors}


GOOD = [
    {"id": "one", "image": "face.png", "audio": "speech.wav", "prompt": "a person talks", "seed": 7},
    {"id": "dub", "video": "talk.mp4", "audio": "speech.wav", "prompt": "dubbed", "output": "dub-fr.mp4",
     "steps": 8, "scheduler": "unipc", "shift": 5, "text_scale": 4.5, "audio_scale": 3, "color_match": "hm",
     "color_strength": 0.5},
    {"id": "pair", "image": "face.png", "audio_1": "speech.wav", "audio_2": "talk.mp4", "audio_type": "add",
     "boxes": [[0, 0, 30, 48], [34, 0, 64, 48]], "prompt": "two people", "negative_prompt": "blurry"},
]


# ---------------------------------------------------------------------------------------------------------
# Formats and paths
# ---------------------------------------------------------------------------------------------------------


def test_jsonl_csv_and_parquet_give_the_same_jobs(inputs):
    rows, errors = read_manifest(write_jsonl(inputs / "m.jsonl", GOOD), BASE)
    assert errors == []
    assert [r.job.id for r in rows] == ["one", "dub", "pair"] and [r.row for r in rows] == [1, 2, 3]
    one, dub, pair = rows
    assert one.job.image == str(inputs / "face.png") and one.job.audio == (str(inputs / "speech.wav"),)
    assert one.job.seed == 7 and one.output == "one.mp4" and one.overrides == {}
    assert dub.job.video == str(inputs / "talk.mp4") and dub.output == "dub-fr.mp4"
    assert pair.job.audio == (str(inputs / "speech.wav"), str(inputs / "talk.mp4"))
    assert pair.job.boxes == (Box(0, 0, 30, 48), Box(34, 0, 64, 48)) and pair.job.audio_type == "add"
    assert pair.job.negative_prompt == "blurry" and pair.job.seed == 0

    assert read_manifest(write_csv(inputs / "m.csv", GOOD), BASE) == (rows, [])
    assert read_manifest(write_parquet(inputs / "m.parquet", GOOD), BASE) == (rows, [])


def test_parquet_from_pandas_keeps_ints_with_gaps_and_drops_its_index(inputs):
    # pandas writes an integer column with missing values as floats, and a filtered frame's index as a column.
    table = pa.Table.from_pylist([{"id": "one", "image": "face.png", "audio": "speech.wav", "seed": 7.0,
                                   "steps": float("nan"), "__index_level_0__": 3}])
    table = table.replace_schema_metadata({"pandas": json.dumps({"index_columns": ["__index_level_0__"]})})
    pq.write_table(table, inputs / "pandas.parquet")
    rows, errors = read_manifest(str(inputs / "pandas.parquet"), BASE)
    assert errors == [] and rows[0].job.seed == 7 and rows[0].overrides == {}


def test_csv_keeps_ids_as_written_and_empty_cells_mean_not_given(inputs):
    path = inputs / "ids.csv"
    path.write_text("id,image,audio,seed,steps\n007,face.png,speech.wav,,\n8,face.png,speech.wav,3,12\n")
    rows, errors = read_manifest(str(path), BASE)
    assert errors == []
    assert [(r.job.id, r.job.seed, r.overrides) for r in rows] == [("007", 0, {}), ("8", 3, {"steps": 12})]


def test_relative_absolute_and_url_paths(inputs):
    sub = inputs / "batch"
    sub.mkdir(exist_ok=True)
    record = {"id": "a", "image": "../face.png", "audio": str(inputs / "speech.wav")}
    rows, errors = read_manifest(write_jsonl(sub / "m.jsonl", [record]), BASE, allow=[str(inputs)])
    assert errors == []
    assert rows[0].job.image == str(inputs / "face.png") and rows[0].job.audio == (str(inputs / "speech.wav"),)

    # file:// URLs, for the manifest or an input, become plain paths that ffmpeg reads.
    record = {"id": "a", "image": "face.png", "audio": f"file://{inputs}/speech.wav"}
    rows, errors = read_manifest(f"file://{write_jsonl(inputs / 'u.jsonl', [record])}", BASE)
    assert errors == [] and rows[0].job.image == str(inputs / "face.png")
    assert rows[0].job.audio == (str(inputs / "speech.wav"),)


def test_manifest_at_a_url_resolves_against_its_folder(inputs):
    root = f"memory://manifest-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/media/face.png", (inputs / "face.png").read_bytes())
    fs.pipe(f"{root}/jobs/speech.wav", b"remote files are checked to exist, not probed")
    records = [{"id": "a", "image": "../media/face.png", "audio": "speech.wav"},
               {"id": "mixed", "image": str(inputs / "face.png"), "audio": f"{root}/jobs/speech.wav"},
               {"id": "gone", "image": "face.png", "audio": "speech.wav"}]
    fs.pipe(f"{root}/jobs/m.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    try:
        rows, errors = read_manifest(f"{root}/jobs/m.jsonl", BASE, allow=[f"{root}/media", str(inputs)])
    finally:
        fs.rm(root, recursive=True)
    assert [r.job.id for r in rows] == ["a", "mixed"]
    assert rows[0].job.image == f"{root}/media/face.png" and rows[0].job.audio == (f"{root}/jobs/speech.wav",)
    assert rows[1].job.image == str(inputs / "face.png")
    assert reasons(errors) == {"gone": f"image {root}/jobs/face.png: no such file"}


class _Recorder(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records the paths asked for."""

    asked: list[str] = []

    def log_message(self, *args) -> None:
        type(self).asked.append(self.path)


@pytest.fixture
def web(inputs):
    """An HTTP server on 127.0.0.1 serving `inputs`; yields (its URL, the paths it was asked for)."""
    handler = type("Handler", (_Recorder,), {"asked": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(inputs)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.asked
    server.shutdown()
    server.server_close()


def test_inputs_outside_the_allowed_locations_are_refused_before_anything_reads_them(inputs, tmp_path, web):
    """A manifest may name media in its own folder; a path elsewhere (absolute, through .., through a link,
    a URL) is refused in one line naming the column and the path, before anything reads or fetches it,
    until inputs.allow names its location."""
    url, asked = web
    batch, elsewhere = tmp_path / "batch", tmp_path / "elsewhere"
    batch.mkdir()
    elsewhere.mkdir()
    for name in ("face.png", "speech.wav"):
        (batch / name).write_bytes((inputs / name).read_bytes())
        (elsewhere / name).write_bytes((inputs / name).read_bytes())
    os.symlink(elsewhere / "face.png", batch / "link.png")
    records = [{"id": "ok", "image": "face.png", "audio": "speech.wav"},
               {"id": "absolute", "image": "face.png", "audio": str(elsewhere / "speech.wav")},
               {"id": "up", "image": "../elsewhere/face.png", "audio": "speech.wav"},
               {"id": "link", "image": "link.png", "audio": "speech.wav"},
               {"id": "web", "image": f"{url}/face.png", "audio": "speech.wav"}]
    manifest = write_jsonl(batch / "m.jsonl", records)
    rows, errors = read_manifest(manifest, BASE)
    assert [r.job.id for r in rows] == ["ok"]
    tail = "add its folder or URL prefix to inputs.allow to read it"
    where = f"outside the locations inputs may be read from (the manifest's folder {batch})"
    assert reasons(errors) == {
        "absolute": f"audio {elsewhere / 'speech.wav'}: {where}; {tail}",
        "up": f"image {elsewhere / 'face.png'}: {where}; {tail}",
        "link": f"image {batch / 'link.png'}: {where}; it is {elsewhere / 'face.png'} once its links are followed; {tail}",
        "web": f"image {url}/face.png: {where}; {tail}",
    }
    assert asked == []  # the server was never asked

    rows, errors = read_manifest(manifest, BASE, allow=[str(elsewhere), f"{url}/"])
    assert errors == [] and [r.job.id for r in rows] == ["ok", "absolute", "up", "link", "web"]
    assert asked  # the remote file was checked to exist
    # The run's object store is allowed without naming it: a manifest there names media beside it.
    rows, errors = read_manifest(manifest, BASE, allow=[str(elsewhere)], storage_root=f"{url}/runs/r1")
    assert errors == [] and len(rows) == 5


def test_a_file_that_would_make_ffmpeg_open_others_is_refused(inputs, tmp_path):
    """An ffconcat list named speech.wav and an HLS playlist: plain ffmpeg reads the other file they name;
    the manifest's probe refuses them, naming the column and the file."""
    (tmp_path / "other.wav").write_bytes((inputs / "speech.wav").read_bytes())
    (tmp_path / "face.png").write_bytes((inputs / "face.png").read_bytes())
    (tmp_path / "speech.wav").write_text("ffconcat version 1.0\nfile other.wav\n")
    (tmp_path / "speech.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nother.wav\n#EXT-X-ENDLIST\n")
    for name, opened in (("speech.wav", "Audio: pcm_s16le"), ("speech.m3u8", f"Opening 'file:{tmp_path / 'other.wav'}'")):
        plain = subprocess.run([media.ffmpeg_binary(), "-hide_banner", "-nostdin", "-i", f"file:{tmp_path / name}"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert opened in plain.stderr  # ffmpeg alone opens other.wav through it
    records = [{"id": name, "image": "face.png", "audio": name} for name in ("speech.wav", "speech.m3u8")]
    rows, errors = read_manifest(write_jsonl(tmp_path / "m.jsonl", records), BASE)
    assert rows == []
    for error in errors:
        assert error.reason == (f"audio {tmp_path / error.id}: ffmpeg finds a format outside the images, audio and "
                                "video containers the farm reads (pipeline.media.process.INPUT_FORMATS): playlists "
                                "and file lists, which make ffmpeg open other files, are refused")


# ---------------------------------------------------------------------------------------------------------
# Bad rows
# ---------------------------------------------------------------------------------------------------------


def test_each_bad_row_gets_its_reason_and_the_good_rows_run(inputs):
    ok = {"image": "face.png", "audio": "speech.wav"}
    bad = [
        {"id": "missing-file", "image": "nope.png", "audio": "speech.wav"},
        {"id": "text-as-audio", "image": "face.png", "audio": "notes.wav"},
        {"id": "silent-audio", "image": "face.png", "audio": "silent.mp4"},
        {"id": "audio-as-image", "image": "speech.wav", "audio": "speech.wav"},
        {"id": "typo", **ok, "stpes": 8},
        {"id": "stranger", **ok, "mood": "happy"},
        {"id": "twice", **ok},  # rows 8 and 9 share an id: both fail
        {"id": "twice", **ok},
        {"id": "same-output", **ok, "output": "one.mp4"},
        {"id": "both", **ok, "video": "talk.mp4"},
        {"id": "neither", "audio": "speech.wav"},
        {"id": "no-audio", "image": "face.png"},
        {"id": "second-only", "image": "face.png", "audio_2": "speech.wav"},
        {"id": "two-firsts", "image": "face.png", "audio": "speech.wav", "audio_1": "speech.wav"},
        {"id": "zero-steps", **ok, "steps": 0},
        {"id": "bad-scheduler", **ok, "scheduler": "nope"},
        {"id": "distill-needs-4", **ok, "scheduler": "flowmatch_distill"},
        {"id": "bad-colour", **ok, "color_match": "sepia", "text_scale": "loud"},
        {"id": "bad-seed", **ok, "seed": "abc"},
        {"id": "negative-seed", **ok, "seed": -1},
        {"id": "bad-type", "image": "face.png", "audio_1": "speech.wav", "audio_2": "speech.wav",
         "audio_type": "duet"},
        {"id": "flat-boxes", "image": "face.png", "audio_1": "speech.wav", "audio_2": "speech.wav",
         "boxes": [0, 0, 10, 10]},
        {"id": "box-outside", "image": "face.png", "audio_1": "speech.wav", "audio_2": "speech.wav",
         "boxes": [[0, 0, 30, 48], [34, 0, 99, 48]]},
        {"id": "boxes-for-one", **ok, "boxes": [[0, 0, 30, 48], [34, 0, 64, 48]]},
        {"id": "bad/id", **ok},
        {"id": "mov", **ok, "output": "clip.mov"},
        {"id": "nested", **ok, "output": "dubs/clip.mp4"},
        {"image": "face.png", "audio": "speech.wav"},
        {"id": "two-problems", "image": "nope.png", "audio": "speech.wav", "steps": 0},
    ]
    rows, errors = read_manifest(write_jsonl(inputs / "bad.jsonl", [GOOD[0], *bad, GOOD[1]]), BASE)
    assert [r.job.id for r in rows] == ["one", "dub"] and [r.row for r in rows] == [1, len(bad) + 2]
    assert [e.row for e in errors] == list(range(2, len(bad) + 2))
    expected = [  # (RowError.id, part of its reason), in row order
        ("missing-file", f"image {inputs / 'nope.png'}: no such file"),
        ("text-as-audio", f"audio {inputs / 'notes.wav'}: ffmpeg cannot read it"),
        ("silent-audio", f"audio {inputs / 'silent.mp4'}: no audio stream"),
        ("audio-as-image", f"image {inputs / 'speech.wav'}: no picture in it"),
        ("typo", "unknown column 'stpes'; did you mean 'steps'?"),
        ("stranger", "unknown column 'mood'; known columns: id, image,"),
        ("twice", "id: 'twice' is also the id of row 9"),
        ("twice", "id: 'twice' is also the id of row 8"),
        ("same-output", "output: 'one.mp4' is also the output of row 1"),
        ("both", "image, video: give exactly one (both given)"),
        ("neither", "image, video: give exactly one (neither given)"),
        ("no-audio", "audio: missing"),
        ("second-only", "audio: missing (audio_2 is the second speaker; the first is audio or audio_1)"),
        ("two-firsts", "audio, audio_1: both name speaker 1's track"),
        ("zero-steps", "steps must be a positive integer, got 0"),
        ("bad-scheduler", "unknown scheduler 'nope'"),
        ("distill-needs-4", "scheduler 'flowmatch_distill' runs exactly 4 steps"),
        ("bad-colour", "text_scale: expected a finite number, got 'loud'"),
        ("bad-seed", "seed: expected a whole number, got 'abc'"),
        ("negative-seed", "seed -1 must be in [0, 2**63)"),
        ("bad-type", "audio_type 'duet' is not one of ['para', 'add']"),
        ("flat-boxes", "boxes: expected [[left, top, right, bottom], [left, top, right, bottom]]"),
        ("box-outside", "boxes: speaker 2: box [left=34.0, top=0.0, right=99.0, bottom=48.0] must satisfy"),
        ("boxes-for-one", "2 boxes for 1 speakers"),
        (None, "id: 'bad/id' must be a plain file name"),
        ("mov", "output: 'clip.mov' must end in .mp4"),
        ("nested", "output: 'dubs/clip.mp4' must be a plain file name"),
        (None, "id: missing"),
        ("two-problems", f"image {inputs / 'nope.png'}: no such file"),
    ]
    assert [e.id for e in errors] == [job_id for job_id, _ in expected]  # an unusable id is None
    for error, (_, reason) in zip(errors, expected):
        assert reason in error.reason and "\n" not in error.reason, (error, reason)
    found = reasons(errors)
    assert "color_match: 'sepia' is not one of mkl, hm, reinhard, lab, none" in found["bad-colour"]
    assert "steps must be a positive integer" in found["two-problems"]  # every problem, in one line


def test_audio_shorter_than_one_wav2vec2_window_is_refused(inputs, tmp_path):
    # 10 ms at 44.1 kHz is 441 samples, more than the window's 400, but 160 at the encoder's 16 kHz.
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=44100:duration=0.01", str(tmp_path / "blip.wav"))
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=16000:duration=0.025", str(tmp_path / "window.wav"))
    face, speech, blip = inputs / "face.png", inputs / "speech.wav", tmp_path / "blip.wav"
    records = [{"id": "short", "image": str(face), "audio": "blip.wav"},
               {"id": "short-second", "image": str(face), "audio_1": str(speech), "audio_2": "blip.wav"},
               {"id": "one-window", "image": str(face), "audio": "window.wav"}]
    rows, errors = read_manifest(write_jsonl(tmp_path / "short.jsonl", records), BASE, allow=[str(inputs)])
    assert [r.job.id for r in rows] == ["one-window"]
    too_short = "0.010 s of audio is shorter than wav2vec2's 400-sample window (25 ms at 16 kHz)"
    assert reasons(errors) == {"short": f"audio {blip}: {too_short}", "short-second": f"audio_2 {blip}: {too_short}"}


def test_a_picture_smaller_than_the_minimum_is_refused(inputs, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "dot.png")
    Image.new("RGB", (100, 63)).save(tmp_path / "strip.png")  # one side short is enough
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=48x48:rate=25:duration=0.2", "-c:v", "libx264",
           str(tmp_path / "tiny.mp4"))
    speech = str(inputs / "speech.wav")
    records = [{"id": "dot", "image": "dot.png", "audio": speech},
               {"id": "strip", "image": "strip.png", "audio": speech},
               {"id": "tiny", "video": "tiny.mp4", "audio": speech},
               {"id": "at-image", "image": str(inputs / "face.png"), "audio": speech},  # 64x64, the minimum
               {"id": "at-video", "video": str(inputs / "talk.mp4"), "audio": speech}]
    rows, errors = read_manifest(write_jsonl(tmp_path / "small.jsonl", records), BASE, allow=[str(inputs)])
    assert [r.job.id for r in rows] == ["at-image", "at-video"]
    assert reasons(errors) == {
        "dot": f"image {tmp_path / 'dot.png'}: 4x4 is smaller than the minimum 64x64",
        "strip": f"image {tmp_path / 'strip.png'}: 100x63 is smaller than the minimum 64x64",
        "tiny": f"video {tmp_path / 'tiny.mp4'}: 48x48 is smaller than the minimum 64x64"}


def test_an_id_or_output_too_long_for_a_file_name_is_refused(inputs):
    ok = {"image": "face.png", "audio": "speech.wav"}
    records = [{"id": "a" * 300, **ok},
               {"id": "é" * 101, **ok},  # 101 characters, but 202 bytes of UTF-8: file names are limited in bytes
               {"id": "long-output", **ok, "output": "o" * 197 + ".mp4"},
               {"id": "b" * 200, **ok},  # exactly the limit
               {"id": "c", **ok, "output": "o" * 196 + ".mp4"}]
    rows, errors = read_manifest(write_jsonl(inputs / "long.jsonl", records), BASE)
    too_long = "id: 300 bytes is longer than the 200 allowed (it becomes a file name)"
    assert [r.job.id for r in rows] == ["b" * 200, "c"] and rows[0].output == "b" * 200 + ".mp4"
    assert [(e.row, e.id, e.reason) for e in errors] == [
        (1, None, too_long),
        (2, None, "id: 202 bytes is longer than the 200 allowed (it becomes a file name)"),
        (3, "long-output", "output: 201 bytes is longer than the 200 allowed (it becomes a file name)")]
    rows, errors = single_job({"id": "a" * 300, **ok}, str(inputs), BASE)
    assert rows == [] and [e.reason for e in errors] == [too_long]


def test_unknown_column_fails_only_the_rows_that_fill_it(inputs):
    path = inputs / "extra.csv"
    path.write_text("id,image,audio,colour\na,face.png,speech.wav,\nb,face.png,speech.wav,red\n")
    rows, errors = read_manifest(str(path), BASE)
    assert [r.job.id for r in rows] == ["a"]
    assert [(e.id, e.reason.split(";")[0]) for e in errors] == [("b", "unknown column 'colour'")]


def test_each_file_is_probed_once_however_many_rows_use_it(inputs, monkeypatch):
    probed = []
    real_probe = media.probe
    monkeypatch.setattr(media, "probe", lambda path: probed.append(path) or real_probe(path))
    records = [{"id": f"job-{i}", "image": "face.png", "audio": "speech.wav"} for i in range(500)]
    rows, errors = read_manifest(write_jsonl(inputs / "many.jsonl", records), BASE)
    assert len(rows) == 500 and errors == []
    assert sorted(probed) == [str(inputs / "face.png"), str(inputs / "speech.wav")]


@pytest.mark.parametrize("name, content, problem", [  # `problem`: how the message goes on after the path
    ("absent.jsonl", None, "no such file"),
    ("broken.jsonl", '{"id": "a"}\n\n{"id": "b",\n',  # a blank line still counts as a line of the file
     "line 3: not valid JSON (Expecting property name enclosed in double quotes, column 12)"),
    ("list.jsonl", '{"id": "a"}\n["a", "b"]\n', "line 2: expected one JSON object {...} per line"),
    ("jobs.txt", "id\n", "unknown manifest format '.txt'; use .jsonl, .csv, .parquet"),
    ("twice.csv", "id,image,id\na,b,c\n", "column 'id': appears more than once (columns 1, 3)"),
    ("ragged.csv", "id,image\na,b,c\n", "not a readable CSV file ("),
    ("fake.parquet", "not parquet", "not a readable Parquet file ("),
])
def test_unreadable_manifest_is_a_manifest_error(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManifestError) as error:
        read_manifest(str(path), BASE)
    message = str(error.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message, message


# ---------------------------------------------------------------------------------------------------------
# Settings, single jobs, the demo
# ---------------------------------------------------------------------------------------------------------


def test_overrides_reach_render_settings(inputs):
    rows, _ = read_manifest(write_jsonl(inputs / "m.jsonl", GOOD), BASE)
    base = RenderSettings(steps=30, crf=20)
    assert settings_for(rows[0], base) == base
    assert settings_for(rows[1], base) == RenderSettings(steps=8, scheduler="unipc", shift=5.0, text_scale=4.5,
                                                         audio_scale=3.0, color_match="hm", color_strength=0.5,
                                                         crf=20)


def test_overrides_are_checked_with_the_runs_settings(inputs):
    record = {"id": "a", "image": "face.png", "audio": "speech.wav", "scheduler": "flowmatch_distill"}
    path = write_jsonl(inputs / "distill.jsonl", [record])
    assert read_manifest(path, BASE)[0] == []  # the run's 40 steps do not suit the distilled schedule
    rows, errors = read_manifest(path, RenderSettings(steps=4))
    assert errors == [] and settings_for(rows[0], RenderSettings(steps=4)).scheduler == "flowmatch_distill"


@pytest.mark.parametrize("overrides, reasons", [
    ({"steps": 0}, ["steps: steps must be a positive integer, got 0"]),
    ({"color_strength": "inf"}, ["color_strength: expected a finite number, got 'inf'"]),
    # every bad override, each naming its column
    ({"scheduler": "nope", "color_match": "sepia", "shift": 5},
     ["scheduler: unknown scheduler 'nope' (known: euler, flowmatch_distill, unipc, dpm++_sde)",
      "color_match: 'sepia' is not one of mkl, hm, reinhard, lab, none"]),
    # a setting the row does not give, refused in the company of the columns it does
    ({"scheduler": "flowmatch_distill", "shift": 5},
     ["scheduler, shift: scheduler 'flowmatch_distill' runs exactly 4 steps (timesteps [999, 750, 500, 250]), "
      "got steps=40 (the run's steps)"]),
])
def test_a_bad_override_gets_a_reason_naming_its_column(inputs, overrides, reasons):
    record = {"id": "a", "image": "face.png", "audio": "speech.wav", **overrides}
    rows, errors = read_manifest(write_jsonl(inputs / "override.jsonl", [record]), BASE)
    assert rows == [] and [(e.row, e.id) for e in errors] == [(1, "a")]
    assert errors[0].reason.split("; ") == reasons


def test_audio_or_audio_1_is_the_first_speaker(inputs):
    pair = {"id": "pair", "image": "face.png", "audio_2": "talk.mp4", "audio_type": "add"}
    rows, errors = read_manifest(write_jsonl(inputs / "pairs.jsonl", [{**pair, "audio": "speech.wav"}]), BASE)
    assert errors == [] and rows == read_manifest(write_jsonl(inputs / "pairs.jsonl", [
        {**pair, "audio_1": "speech.wav"}]), BASE)[0]
    assert rows[0].job.audio == (str(inputs / "speech.wav"), str(inputs / "talk.mp4"))


def test_single_job_is_checked_like_a_manifest_row(inputs):
    rows, errors = single_job({"id": "cli", "image": "face.png", "audio": "speech.wav", "steps": "8"},
                              str(inputs), BASE)
    assert errors == [] and rows[0].job.image == str(inputs / "face.png") and rows[0].overrides == {"steps": 8}
    # As farm.config's job group gives it: every field, unset ones null, and no id (named after the audio).
    cli = {"id": None, "image": "face.png", "video": None, "audio": "speech.wav", "audio_2": None,
           "audio_type": "para", "boxes": None, "prompt": "", "negative_prompt": None, "seed": 0, "output": None}
    rows, errors = single_job(cli, str(inputs), BASE)
    assert errors == [] and rows[0].job.id == "speech" and rows[0].output == "speech.mp4"
    rows, errors = single_job({"id": "cli", "image": "face.png"}, str(inputs), BASE)
    assert rows == [] and [(e.row, e.id) for e in errors] == [(1, "cli")] and "audio: missing" in errors[0].reason


def test_demo_manifest_validates_cleanly():
    demo = REPO / "jobs" / "demo"
    rows, errors = read_manifest(str(demo / "manifest.jsonl"), BASE)
    assert errors == [] and len(rows) >= 1
    image = media.probe(demo / "astronaut.png")
    speech = media.probe(demo / "speech.wav")
    assert image.frame_size() == (256, 256) and 3 <= speech.audio.duration <= 4.5
    for name in ("astronaut.png", "speech.wav"):
        assert os.path.getsize(demo / name) < 150_000
