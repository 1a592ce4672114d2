"""Jobs whose inputs are fsspec URLs (s3://, gs://, ...) get local copies for ffmpeg to read."""

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec

from pipeline.job import Job


def is_remote(path: str) -> bool:
    """A URL of a filesystem other than the local one (fsspec's protocols; file:// and local:// are local)."""
    return fsspec.core.split_protocol(path)[0] not in (None, "file", "local")


@contextlib.contextmanager
def local_copies(job: Job) -> Iterator[Job]:
    """The job with every URL input downloaded to a temporary directory (removed afterwards); local
    paths are left as they are."""
    with tempfile.TemporaryDirectory(prefix=f"talkfarm-{job.id}-") as tmp:

        def local(path: str | None, slot: str) -> str | None:
            if path is None or not is_remote(path):
                return path
            target = Path(tmp) / f"{slot}{Path(path).suffix}"
            fsspec.filesystem(fsspec.utils.get_protocol(path)).get(path, str(target))
            return str(target)

        yield dataclasses.replace(
            job,
            image=local(job.image, "image"),
            video=local(job.video, "video"),
            audio=tuple(local(a, f"audio{i}") for i, a in enumerate(job.audio)),
        )
