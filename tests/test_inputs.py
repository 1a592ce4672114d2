"""farm.inputs: which paths and URLs lie inside the locations a manifest's media may be read from."""

import os

import pytest

from farm.inputs import check_location, input_locations

CDN = "https://cdn.example.com/media"


@pytest.mark.parametrize("url, inside", [
    (f"{CDN}/a.png", True),
    (f"{CDN}/deep/er/a.png?sig=1", True),
    ("HTTPS://CDN.example.com/media/a.png", True),  # scheme and host are case-insensitive
    ("https://cdn.example.com/media-old/a.png", False),  # a prefix of the name is not the folder
    (f"{CDN}/../secret.png", False),
    (f"{CDN}/%2e%2e/secret.png", False),  # what the server would decode to ..
    ("https://cdn.example.com.evil.org/media/a.png", False),
    ("https://cdn.example.com@evil.org/media/a.png", False),  # user info: the host is evil.org
    ("http://cdn.example.com/media/a.png", False),  # another scheme
    ("s3://cdn.example.com/media/a.png", False),
    ("s3://runs/other-run/face.png", True),  # the run's object store is its whole bucket
    ("s3://runsbucket/face.png", False),
    ("zip://a.wav::s3://runs/x.zip", False),  # a chain is not a file of the bucket
])
def test_url_prefixes(url, inside, tmp_path):
    locations = input_locations(str(tmp_path), "s3://runs/talkfarm/r1", [CDN])
    assert (locations.problem(url) is None) == inside


def test_local_folders_follow_links(tmp_path):
    batch, elsewhere = tmp_path / "batch", tmp_path / "elsewhere"
    batch.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.wav").write_bytes(b"RIFF")
    os.symlink(elsewhere / "secret.wav", batch / "speech.wav")
    os.symlink(elsewhere, batch / "more")
    locations = input_locations(str(batch), str(tmp_path / "run"), [])
    assert locations.problem(str(batch / "face.png")) is None
    assert locations.problem(str(batch)) is None
    for path in (batch / "speech.wav", batch / "more" / "secret.wav", tmp_path / "batch-2" / "a.png", tmp_path / "run"):
        assert locations.problem(str(path)) is not None, path
    problem = locations.problem(str(batch / "speech.wav"))
    assert problem == (f"outside the locations inputs may be read from (the manifest's folder {batch}); it is "
                       f"{elsewhere / 'secret.wav'} once its links are followed; add its folder or URL prefix to "
                       "inputs.allow to read it")
    # inputs.allow takes folders (relative to the current directory, ~, file:// URLs) and URL prefixes
    locations = input_locations(str(batch), "memory://store/run", [f"file://{elsewhere}", CDN])
    assert locations.problem(str(batch / "speech.wav")) is None
    assert locations.problem("memory://store/other/face.png") is None


@pytest.mark.parametrize("location, problem", [
    ("", "an empty location would allow nothing; give a folder or a URL prefix"),
    ("s3:///media", "'s3:///media' has no host or bucket: write scheme://host/path"),
    ("/data/media", None),
    ("media", None),
    ("https://cdn.example.com", None),
])
def test_check_location(location, problem):
    assert check_location(location) == problem
