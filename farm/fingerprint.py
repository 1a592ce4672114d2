"""What a row's video depends on, as short digests kept with the row (results.parquet `fingerprint`): the
bytes of each input file, the row's own fields, and the run's settings and model. A re-run skips a finished
row, or resumes its stored windows, only while every part is unchanged; a row whose parts changed is
rendered again from nothing, and the log names the parts.

Local files are hashed whole (each distinct file once per run); on an object store its own checksum
(ETag, MD5 or CRC32C) stands for the bytes, so nothing is downloaded.
"""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import fsspec
from fsspec.implementations.local import LocalFileSystem

from farm.manifest import ManifestRow

CHECKSUM_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5")  # s3fs, adlfs, gcsfs info()
DIGEST_CHARS = 16
PARALLEL = 16  # object stores answer info() in tens of milliseconds: ask for many at once


def digest(value) -> str:
    """A digest of a JSON-able value (dicts in key order)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def input_digest(location: str) -> str:
    """A digest of the file's bytes: its SHA-256, or an object store's checksum with its size."""
    fs, path = fsspec.core.url_to_fs(location)
    if not isinstance(fs, LocalFileSystem):
        info = fs.info(path)
        for key in CHECKSUM_KEYS:
            if info.get(key):
                return digest([key, str(info[key]), info.get("size")])
    sha = hashlib.sha256()
    with fs.open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:DIGEST_CHARS]


def _inputs(row: ManifestRow) -> dict[str, str]:
    """The row's input files by manifest column."""
    job = row.job
    tracks = {"audio": job.audio[0]} if len(job.audio) == 1 else {f"audio_{i}": a for i, a in enumerate(job.audio, 1)}
    return {"image": job.image, "video": job.video, **tracks}


def fingerprints(rows: list[ManifestRow], run_settings: str) -> dict[str, dict[str, str]]:
    """{job id: {part: digest}} for every row: one part per input file (by its column), `row` for the row's
    own fields (prompt, seed, speakers, output name, setting overrides) and `settings` (`run_settings`, the
    digest of the run's settings and model)."""
    locations = sorted({location for row in rows for location in _inputs(row).values() if location})
    with ThreadPoolExecutor(PARALLEL) as pool:
        digests = dict(zip(locations, pool.map(input_digest, locations)))
    result = {}
    for row in rows:
        job = row.job
        own = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
               "audio_type": job.audio_type, "boxes": job.boxes, "output": row.output, "overrides": row.overrides}
        parts = {column: digests[location] for column, location in _inputs(row).items() if location}
        result[job.id] = {**parts, "row": digest(own), "settings": run_settings}
    return result


def changed_parts(before: dict[str, str], now: dict[str, str]) -> list[str]:
    return sorted(part for part in before.keys() | now.keys() if before.get(part) != now.get(part))
