"""Running ffmpeg: the executable, command lines, one process with its stderr drained, WAV on a pipe.

The executable is `ffmpeg` from PATH, else the one in the imageio-ffmpeg wheel. Commands are built with
ffmpeg-python; they run as subprocesses whose stderr is drained on a thread, so that a chatty ffmpeg never
blocks and a failure reports what it said. Every error is a MediaError: one line, naming the file and the
problem.
"""

import functools
import os
import re
import shutil
import struct
import subprocess
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import ffmpeg

PathLike = str | os.PathLike


class MediaError(RuntimeError):
    """A media file could not be read or written. The message is one line: `<path>: <problem>`."""

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


def ffmpeg_binary() -> str:
    """The ffmpeg executable: `ffmpeg` on PATH, else the binary shipped in the imageio-ffmpeg wheel."""
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise MediaError("ffmpeg", f"no executable: none on PATH and none from imageio-ffmpeg ({e})") from None


def _file_url(path: PathLike) -> str:
    # The file: protocol keeps names with a colon ("take:2.mp4") or a leading dash from being misread.
    return "file:" + os.fspath(path)


# The demuxers a media file is read with: still images, audio and video containers. Playlist and list
# demuxers (hls, concat, dash, ...) are left out, and every input is read as a plain file with no other
# protocol: a crafted file (a playlist named face.mp4) cannot make ffmpeg open other files or URLs.
# Remote inputs are downloaded first (farm/localize.py), so no input needs another protocol.
INPUT_FORMATS = (
    "image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif", "yuv4mpegpipe",  # images
    "wav", "w64", "mp3", "flac", "ogg", "aac", "aiff", "caf", "asf",  # audio (asf: wma)
    "mov", "matroska", "avi", "mpegts", "mpeg", "flv",  # video (mov: also mp4 and m4a)
)
_INPUT_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(INPUT_FORMATS)}


def _input(path: PathLike, **options):
    """ffmpeg-python's input node for a media file: read only as itself (INPUT_FORMATS)."""
    return ffmpeg.input(_file_url(path), **_INPUT_OPTIONS, **options)


def _input_args(path: PathLike) -> list[str]:
    """`_input` as ffmpeg arguments, for a command built by hand."""
    return [arg for key, value in _INPUT_OPTIONS.items() for arg in (f"-{key}", value)] + ["-i", _file_url(path)]


def _command(stream_spec, *global_args: str) -> list[str]:
    """Full argument list for an ffmpeg-python output node, our global options first."""
    return [ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *global_args,
            *stream_spec.get_args()]


@functools.lru_cache(maxsize=None)
def _passthrough(binary: str) -> dict[str, str]:
    """Output option that makes ffmpeg emit exactly the frames its filters produce: image2pipe and rawvideo
    are constant-frame-rate muxers, for which ffmpeg would otherwise duplicate or drop frames (e.g. fill the
    gap before a trimmed range). -fps_mode since ffmpeg 5.1; -vsync before it (removed in ffmpeg 8)."""
    help_text = subprocess.run([binary, "-hide_banner", "-h", "long"], capture_output=True,
                               stdin=subprocess.DEVNULL).stdout
    return {"fps_mode": "passthrough"} if b"-fps_mode" in help_text else {"vsync": "passthrough"}


def _tidy(lines: Iterable[str], keep: int = 4) -> str:
    """ffmpeg's stderr as one line: the first lines (usually the cause) and the last one, without ffmpeg's
    object addresses."""
    useful = [re.sub(r" @ 0x[0-9a-f]+", "", line.strip()) for line in lines if line.strip()]
    if len(useful) > keep:
        useful = useful[:keep - 1] + ["..."] + useful[-1:]
    text = " | ".join(useful) or "no message"
    return text if len(text) <= 600 else text[:597] + "..."


class _FFmpeg:
    """One running ffmpeg. Its stderr is drained on a thread, keeping its first and last lines for errors."""

    def __init__(self, args: list[str], path: PathLike, *, stdin: bool = False, stdout: bool = False):
        self.path = path
        self._head: list[str] = []
        self._tail: deque[str] = deque(maxlen=3)
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            text = line.decode("utf-8", "replace")
            if text.strip():
                (self._head if len(self._head) < 3 else self._tail).append(text)

    def failure(self, what: str) -> MediaError:
        return MediaError(self.path, f"{what}: {_tidy(self._head + list(self._tail))}")

    def finish(self, what: str) -> None:
        """Close stdin, wait for the exit, raise MediaError(`what`: what ffmpeg said) unless it succeeded."""
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        code = self.proc.wait()
        self._close()
        if code != 0:
            raise self.failure(f"{what} (ffmpeg exit {code})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._drain.join()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe:
                try:
                    pipe.close()
                except BrokenPipeError:  # stdin with unflushed data after ffmpeg died
                    pass


def _require_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file" if not path.exists() else "not a regular file")
    return path


class _WavDecoder:
    """Context manager: the first audio stream decoded to WAV on a pipe. `.channels`, `.sample_rate` and
    `.frame_bytes` come from the WAV header; `.blocks()` yields the sample data."""

    _CODECS = {"s16": ("pcm_s16le", 2), "flt": ("pcm_f32le", 4)}

    def __init__(self, path: Path, sample_rate: int | None, sample_format: str):
        codec, self._sample_bytes = self._CODECS[sample_format]
        options = {"acodec": codec, "map_metadata": -1, "fflags": "+bitexact"}
        if sample_rate is not None:
            options["ar"] = sample_rate
        spec = ffmpeg.output(_input(path)["a:0"], "pipe:", format="wav", **options)
        self.path = path
        self._proc = _FFmpeg(_command(spec), path, stdout=True)

    def __enter__(self) -> "_WavDecoder":
        pipe = self._proc.proc.stdout
        header = pipe.read(12)
        if len(header) < 12 or header[:4] not in (b"RIFF", b"RF64") or header[8:12] != b"WAVE":
            self._fail()
        fmt = None
        while True:
            chunk = pipe.read(8)
            if len(chunk) < 8:
                self._fail()
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                break
            body = pipe.read(length + (length & 1))
            if name == b"fmt ":
                fmt = struct.unpack("<HHI", body[:8])
        if fmt is None:
            self._fail()
        self.channels, self.sample_rate = fmt[1], fmt[2]
        self.frame_bytes = self.channels * self._sample_bytes
        return self

    def _fail(self):
        self._proc.finish("decoding audio")  # raises with ffmpeg's own message when it failed
        raise MediaError(self.path, "ffmpeg's WAV output has no readable header")

    def blocks(self, size: int = 1 << 20) -> Iterator[bytes]:
        while block := self._proc.proc.stdout.read(size):
            yield block
        self._proc.finish("decoding audio")

    def __exit__(self, *exc) -> None:
        self._proc.kill()
