"""Where a manifest's media may be read from: the manifest's own folder, the run's object store (its
bucket), and the locations of `inputs.allow`; any other path a row names is refused before anything is
read or fetched. A manifest is often written by someone other than the operator, and the driver and the
actors read whatever its rows point at: without this, a row could have the farm fetch any URL (the
manifest check asks a remote file's size) or read any local file the process can read, and put it in a
video.

A location is a local folder (everything under it, after following symbolic links, so a link inside an
allowed folder cannot point out of it) or a URL prefix, `scheme://host/path`: the same scheme and host,
and a path at or under the prefix's path, compared after percent-decoding and removing `.` and `..`
(`https://cdn.example.com/media` allows `https://cdn.example.com/media/a.png`, not
`https://cdn.example.com/media-old/a.png` nor `https://cdn.example.com/media/../secret.png`).
Chained fsspec URLs (`zip://a.wav::s3://b/x.zip`) are refused unless a location is written the same way.
"""

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import fsspec


def is_url(path: str) -> bool:
    return fsspec.core.split_protocol(path)[0] is not None


def local_form(path: str) -> str:
    """file:// and local:// URLs as plain paths, which ffmpeg and the pipeline read; anything else as given."""
    if fsspec.core.split_protocol(path)[0] in ("file", "local"):
        return fsspec.core.url_to_fs(path)[1]
    return path


@dataclass(frozen=True)
class InputLocations:
    """The allowed locations, each with the words a refusal names it by."""

    locations: tuple[tuple[str, str], ...]  # (location, what it is: "the manifest's folder", "inputs.allow", ...)

    def problem(self, path: str) -> str | None:
        """None if `path` (a local path or a URL, as the manifest resolved it) is inside an allowed
        location; else one line saying where it may be read from instead."""
        if any(_inside(path, location) for location, _ in self.locations):
            return None
        where = "; ".join(f"{what} {location}" for location, what in self.locations)
        shown = os.path.realpath(path) if not is_url(path) and os.path.realpath(path) != path else None
        return (f"outside the locations inputs may be read from ({where})"
                + (f"; it is {shown} once its links are followed" if shown else "")
                + "; add its folder or URL prefix to inputs.allow to read it")


def input_locations(manifest_dir: str, storage_root: str, allow: list[str]) -> InputLocations:
    """The manifest's folder, the bucket (or other root) of an object-store run root, and `allow`."""
    locations = [(manifest_dir, "the manifest's folder")]
    if is_url(storage_root) and "::" not in storage_root:
        parts = urlsplit(storage_root)
        locations.append((f"{parts.scheme}://{parts.netloc}/", "the run's object store"))
    for location in map(local_form, allow):
        locations.append((location if is_url(location) else os.path.abspath(os.path.expanduser(location)),
                          "inputs.allow"))
    return InputLocations(tuple(locations))


def check_location(location: str) -> str | None:
    """None if `location` can be an entry of inputs.allow; else why not (validate names the key)."""
    if not location.strip():
        return "an empty location would allow nothing; give a folder or a URL prefix"
    if is_url(location) and "::" not in location and not urlsplit(location).netloc:
        return f"{location!r} has no host or bucket: write scheme://host/path"
    return None


def _inside(path: str, location: str) -> bool:
    if is_url(path) != is_url(location):
        return False
    if not is_url(path):
        path, location = os.path.realpath(path), os.path.realpath(location)
        return os.path.commonpath([path, location]) == location
    if "::" in path or "::" in location:  # a chain: only what a location spells out the same way
        return path == location or path.startswith(location.rstrip("/") + "/")
    url, prefix = urlsplit(path), urlsplit(location)
    if (url.scheme.lower(), url.netloc.lower()) != (prefix.scheme.lower(), prefix.netloc.lower()):
        return False
    inner, root = (posixpath.normpath("/" + unquote(u.path).lstrip("/")) for u in (url, prefix))
    return root == "/" or inner == root or inner.startswith(root + "/")
