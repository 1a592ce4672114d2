"""Media I/O: probing, decoding and encoding, all through one ffmpeg executable.

    probe(path)                    -> MediaInfo: streams, exact frame and sample counts
    read_image(path)               -> [3, H, W] float in [-1, 1]
    read_video_frames(path)        -> [T, 3, H, W] float in [-1, 1], resampled to 25 fps
    read_audio(path)               -> float32 samples, 16 kHz mono by default, from any container ffmpeg reads
    choose_size(h, w) / fit_to     -> aspect-ratio bucket; resize to cover + centre crop
    write_video(path, frames, ...) -> H.264 (yuv420p) + AAC of the original audio, frames streamed to ffmpeg
    concat_segments / combine_audio -> join per-window segments (no re-encode) + audio; mix two speakers

The executable is `ffmpeg` from PATH, else the one in the imageio-ffmpeg wheel. ffprobe is never used (that
wheel has none): stream facts come from the stream dump that `ffmpeg -i` prints, exact counts from running
the stream through ffmpeg (video packets copied to the null muxer, audio decoded to WAV on a pipe). Commands
are built with ffmpeg-python; they run as subprocesses whose stderr is drained on a thread, so that a chatty
ffmpeg never blocks and a failure reports what it said. Every error is a MediaError: one line, naming the
file and the problem.
"""

import functools
import io
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline.windows import FPS, frames_for_duration

log = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 16_000
WHITE = (255, 255, 255)

PathLike = str | os.PathLike


class MediaError(RuntimeError):
    """A media file could not be read or written. The message is one line: `<path>: <problem>`."""

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


# --------------------------------------------------------------------------------------------------------
# Running ffmpeg
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoStream:
    """The first video stream (cover art in audio files is not one)."""

    codec: str
    pix_fmt: str  # e.g. "yuv420p"
    width: int  # as displayed: after the rotation flag and non-square pixels, as the readers deliver it
    height: int
    fps: float | None  # the nominal rate ffmpeg reports (rounded to 2 decimals), None if it reports none
    frame_count: int  # frames stored: one per packet, counted by copying the stream to the null muxer
    rotation: int = 0  # the container's display rotation in degrees (the readers apply it)


@dataclass(frozen=True)
class AudioStream:
    """The first audio stream; `sample_count` is exact (the stream is decoded to count it)."""

    codec: str
    sample_rate: int
    channels: int
    sample_count: int

    @property
    def duration(self) -> float:
        return self.sample_count / self.sample_rate


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    container: str  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "wav", "png_pipe"
    duration: float | None  # the container's duration (10 ms resolution), None if it has none
    video: VideoStream | None
    audio: AudioStream | None

    @property
    def has_video(self) -> bool:
        return self.video is not None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the video (or still image) as displayed."""
        if self.video is None:
            raise MediaError(self.path, "no video stream")
        return self.video.height, self.video.width


@dataclass(frozen=True)
class _Dump:
    """What `ffmpeg -i` prints about a file, before any counting."""

    container: str
    duration: float | None
    video: dict | None  # codec, pix_fmt, width, height, fps, rotation
    audio: dict | None  # codec, sample_rate


_INPUT_LINE = re.compile(r"^Input #0, (.+?), from ", re.M)
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_STREAM_LINE = re.compile(r"^\s*Stream #0:\d+[^:]*: (Video|Audio): (.*)$")
_SIZE = re.compile(r"\b([1-9]\d*)x([1-9]\d*)\b")  # "0x31637661" codec tags cannot match
_SAR = re.compile(r"\[SAR (\d+):(\d+) DAR")
_FPS = re.compile(r"([\d.]+)(k?) (?:fps|tbr)\b")
_RATE = re.compile(r"\b(\d+) Hz\b")
_ROTATION = re.compile(r"display ?matrix: rotation of (-?[\d.]+) degrees", re.I)


def _dump(path: PathLike) -> _Dump:
    """Run `ffmpeg -i` (no output: it exits 1 after printing the stream dump) and parse the first streams."""
    path = _require_file(path)
    result = subprocess.run([ffmpeg_binary(), "-hide_banner", "-nostdin", "-i", _file_url(path)],
                            capture_output=True, stdin=subprocess.DEVNULL)
    text = result.stderr.decode("utf-8", "replace")
    container = _INPUT_LINE.search(text)
    if container is None:
        lines = [line for line in text.splitlines() if "output file must be specified" not in line]
        errors = [line.split("Error opening input:")[-1] for line in lines if "Error opening input:" in line]
        raise MediaError(path, f"ffmpeg cannot read it ({_tidy(errors[-1:] or lines[-1:])})")
    duration = _DURATION.search(text)
    video = audio = None
    in_video = False  # whether the indented lines (metadata, side data) below belong to `video`
    for line in text.splitlines():
        stream = _STREAM_LINE.match(line)
        if stream is None:
            rotation = _ROTATION.search(line)
            if rotation and in_video:
                video["rotation"] = round(float(rotation.group(1))) % 360
            continue
        kind, details = stream.groups()
        in_video = kind == "Video" and video is None and "(attached pic)" not in details
        if in_video:
            video = _parse_video(details)
        elif kind == "Audio" and audio is None:
            rate = _RATE.search(details)
            audio = {"codec": details.split()[0].rstrip(","), "sample_rate": int(rate.group(1)) if rate else 0}
    seconds = (int(duration.group(1)) * 3600 + int(duration.group(2)) * 60 + float(duration.group(3))
               if duration else None)
    return _Dump(container.group(1), seconds, video, audio)


def _parse_video(details: str) -> dict:
    size = _SIZE.search(details)
    width, height = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
    sar = _SAR.search(details)
    if sar and int(sar.group(1)) and int(sar.group(2)):  # non-square pixels: shown stretched to this width
        width = round(width * int(sar.group(1)) / int(sar.group(2)))
    fps = _FPS.search(details)
    fields = re.sub(r"\([^()]*\)", "", details).split(",")  # "h264 (High) (...), yuv420p(tv, bt709), 64x48, ..."
    return {"codec": fields[0].strip(), "pix_fmt": fields[1].strip() if len(fields) > 1 else "", "rotation": 0,
            "width": width, "height": height,
            "fps": float(fps.group(1)) * (1000 if fps.group(2) else 1) if fps else None}


def probe(path: PathLike) -> MediaInfo:
    """Streams of a media file, with exact counts; needs ffmpeg only.

    Three ffmpeg runs: `ffmpeg -i` for the stream dump (codec, size, nominal fps, rotation, sample rate);
    the first video stream copied to the null muxer, counting its packets (no decoding); the first audio
    stream decoded to WAV on a pipe, whose header gives the channel count and whose length the exact sample
    count (encoder delay and padding already removed by ffmpeg). Sizes are as displayed (rotation applied).
    """
    path = _require_file(path)
    dump = _dump(path)
    video = audio = None
    if dump.video is not None:
        v = dump.video
        width, height = (v["height"], v["width"]) if v["rotation"] in (90, 270) else (v["width"], v["height"])
        video = VideoStream(v["codec"], v["pix_fmt"], width, height, v["fps"], _count_packets(path),
                            v["rotation"])
    if dump.audio is not None:
        with _WavDecoder(path, sample_rate=None, sample_format="s16") as wav:
            samples = sum(len(block) for block in wav.blocks()) // wav.frame_bytes
        audio = AudioStream(dump.audio["codec"], wav.sample_rate, wav.channels, samples)
    return MediaInfo(path, dump.container, dump.duration, video, audio)


def _progress_frames(path: PathLike, stream_spec, what: str) -> int:
    """Run an ffmpeg output to the null muxer and return the frame count its -progress report ends on."""
    proc = _FFmpeg(_command(stream_spec, "-nostats", "-progress", "pipe:1"), path, stdout=True)
    report = proc.proc.stdout.read().decode("ascii", "replace")
    proc.finish(what)
    counts = re.findall(r"^frame=(\d+)", report, re.M)
    return int(counts[-1]) if counts else 0


def _count_packets(path: Path) -> int:
    spec = ffmpeg.output(ffmpeg.input(_file_url(path))["V:0"], "-", format="null", c="copy")
    return _progress_frames(path, spec, "counting video frames")


def video_frame_count(path: PathLike, fps: float | None = FPS) -> int:
    """Number of frames read_video_frames(path, fps) returns: the video decoded through the same fps filter
    to the null muxer (exact, costs one decode). fps=None: the frames stored in the file (no decoding)."""
    path = _require_file(path)
    if _dump(path).video is None:
        raise MediaError(path, "no video stream")
    if fps is None:
        return _count_packets(path)
    stream = ffmpeg.input(_file_url(path))["V:0"].filter("fps", fps=fps)
    spec = ffmpeg.output(stream, "-", format="null", **_passthrough(ffmpeg_binary()))
    return _progress_frames(path, spec, "counting video frames")


# --------------------------------------------------------------------------------------------------------
# Still images
# --------------------------------------------------------------------------------------------------------


def read_image(path: PathLike, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """An image as [3, H, W] float32 in [-1, 1], RGB, upright.

    Pillow decodes it (PNG, JPEG, WebP and whatever else it reads; a file it cannot identify goes to ffmpeg,
    first frame). Orientation: the EXIF orientation tag is applied. Colour: an embedded ICC
    profile (RGB, RGBA or CMYK) is converted to sRGB; a CMYK JPEG without one is converted by Pillow (Adobe's
    inverted CMYK is undone). Transparency (alpha channel, palette or tRNS transparency) is composited over
    `background`, white by default: cut-out portraits then look like a studio shot, and the colour a PNG stores
    under transparent pixels (often black or garbage) never leaks in. 16-bit greyscale is scaled from 0..65535
    (Pillow's own conversion would clip it to white); 16-bit RGB(A) PNGs arrive as 8 bits per channel.
    """
    path = _require_file(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            rgb = _rgb_pixels(image, background, path)
    except Image.UnidentifiedImageError:
        try:
            return read_video_frames(path, fps=None, count=1)[0]
        except MediaError as e:
            raise MediaError(path, f"not an image Pillow or ffmpeg can read; {e.problem}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"cannot decode the image ({e})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous() * 2 - 1


def _rgb_pixels(image: Image.Image, background: tuple[int, int, int], path: Path) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1], sRGB, any alpha composited over `background`."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey ("I" is how older Pillow opens it)
        grey = np.clip(np.asarray(image, dtype=np.float32) / 65535, 0, 1)
        return np.repeat(grey[..., None], 3, axis=2)
    image = _to_srgb(image, path)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + np.asarray(background, np.float32) / 255 * (1 - alpha)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def _to_srgb(image: Image.Image, path: Path) -> Image.Image:
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        mode = "RGBA" if image.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=mode)
    except (ImportError, OSError, ValueError) as e:  # ImageCms.PyCMSError is an OSError
        log.warning("%s: ignoring its ICC profile (%s)", path, e)
        return image


# --------------------------------------------------------------------------------------------------------
# Video frames
# --------------------------------------------------------------------------------------------------------


def iter_video_frames(path: PathLike, fps: float | None = FPS, size: tuple[int, int] | None = None,
                      start: int = 0, count: int | None = None, chunk: int = 16) -> Iterator[torch.Tensor]:
    """Frames of the first video stream in chunks of [<=chunk, 3, H, W] float32 in [-1, 1].

    fps: resample with ffmpeg's fps filter (frame k shows the source frame on screen at k/fps, frames dropped
    or repeated; no blending); None keeps the stored frames. start/count: a range of frames, counted after the
    resampling (ffmpeg's trim filter; ffmpeg still decodes from the beginning of the file). Frames arrive
    upright (rotation flag applied) with square pixels; size=(H, W) then applies fit_to.
    """
    path = _require_file(path)
    if _dump(path).video is None:
        raise MediaError(path, "no video stream")
    stream = ffmpeg.input(_file_url(path))["V:0"]
    if fps is not None:
        stream = stream.filter("fps", fps=fps)
    if start > 0 or count is not None:
        stream = stream.trim(start_frame=start, **({} if count is None else {"end_frame": start + count}))
    stream = stream.filter("scale", w="round(iw*sar)", h="ih").filter("setsar", 1)
    # PPM on a pipe: every frame carries its own size, so nothing depends on parsing the stream dump.
    spec = ffmpeg.output(stream, "pipe:", format="image2pipe", vcodec="ppm", pix_fmt="rgb24",
                         **_passthrough(ffmpeg_binary()))
    return iter(()) if count is not None and count <= 0 else _decode_frames(path, _command(spec), size, chunk)


def _decode_frames(path: Path, args: list[str], size: tuple[int, int] | None,
                   chunk: int) -> Iterator[torch.Tensor]:
    proc = _FFmpeg(args, path, stdout=True)
    try:
        batch: list[np.ndarray] = []
        while (frame := _read_ppm(proc.proc.stdout, path)) is not None:
            batch.append(frame)
            if len(batch) == chunk:
                yield _frames_to_tensor(batch, size)
                batch = []
        proc.finish("decoding video")
        if batch:
            yield _frames_to_tensor(batch, size)
    finally:
        proc.kill()


def read_video_frames(path: PathLike, fps: float | None = FPS, size: tuple[int, int] | None = None,
                      start: int = 0, count: int | None = None,
                      indices: Sequence[int] | None = None) -> torch.Tensor:
    """[T, 3, H, W] float32 in [-1, 1]; see iter_video_frames (prefer it for long videos: 832x480 float
    frames take 4.8 MB each).

    indices: instead of a range, these frames (after resampling), in this order, repeats allowed; an index
    past the end gives the last frame. Two passes: video_frame_count, then ffmpeg's select filter picks the
    frames, so only they cross the pipe.
    """
    if indices is not None:
        if start or count is not None:
            raise ValueError("give either indices or start/count, not both")
        return _frames_at(_require_file(path), fps, size, list(indices))
    chunks = list(iter_video_frames(path, fps=fps, size=size, start=start, count=count))
    if not chunks:
        raise MediaError(path, f"no video frames from frame {start} on (at {fps or 'the stored'} fps)")
    return torch.cat(chunks)


def _frames_at(path: Path, fps: float | None, size: tuple[int, int] | None, indices: list[int]) -> torch.Tensor:
    if not indices or min(indices) < 0:
        raise ValueError(f"indices must be a non-empty list of frame numbers >= 0, got {indices}")
    total = video_frame_count(path, fps)
    if total == 0:
        raise MediaError(path, "the video has no frames")
    clamped = [min(i, total - 1) for i in indices]
    wanted = sorted(set(clamped))
    stream = ffmpeg.input(_file_url(path))["V:0"]
    if fps is not None:
        stream = stream.filter("fps", fps=fps)
    stream = stream.trim(end_frame=wanted[-1] + 1).filter("select", "+".join(f"eq(n,{i})" for i in wanted))
    stream = stream.filter("scale", w="round(iw*sar)", h="ih").filter("setsar", 1)
    spec = ffmpeg.output(stream, "pipe:", format="image2pipe", vcodec="ppm", pix_fmt="rgb24",
                         **_passthrough(ffmpeg_binary()))
    frames = torch.cat(list(_decode_frames(path, _command(spec), size, chunk=16)))
    if len(frames) != len(wanted):
        raise MediaError(path, f"expected {len(wanted)} selected frames, ffmpeg gave {len(frames)}")
    row = {index: k for k, index in enumerate(wanted)}
    return frames[[row[i] for i in clamped]]


def _read_ppm(pipe, path: Path) -> np.ndarray | None:
    """One binary PPM ("P6\\n<w> <h>\\n255\\n" + rgb24) from the pipe as [H, W, 3] uint8; None at the end."""
    magic = pipe.read(2)
    if not magic:
        return None
    fields: list[int] = []  # width, height, maximum value; each ends with one whitespace byte
    token = b""
    while magic == b"P6" and len(fields) < 3 and (byte := pipe.read(1)):
        if not byte.isspace():
            token += byte
        elif token:
            fields.append(int(token))
            token = b""
    if magic != b"P6" or len(fields) < 3 or fields[2] != 255:
        raise MediaError(path, "unexpected data in ffmpeg's PPM output")
    width, height = fields[0], fields[1]
    data = pipe.read(width * height * 3)
    if len(data) < width * height * 3:
        raise MediaError(path, "ffmpeg's output ended inside a frame")
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


def _frames_to_tensor(frames: list[np.ndarray], size: tuple[int, int] | None) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return fit_to(batch, *size) if size is not None else batch.contiguous()


# --------------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------------


def read_audio(path: PathLike, sample_rate: int | None = AUDIO_SAMPLE_RATE, mono: bool = True) -> np.ndarray:
    """The first audio stream of any file ffmpeg reads (wav, mp3, m4a, flac, ogg, the track of a video) as
    float32 in [-1, 1]: [S] when mono (the mean of the channels, as librosa's mono=True), else [C, S].

    sample_rate: resampled by ffmpeg (swresample); None keeps the file's rate.
    """
    path = _require_file(path)
    if _dump(path).audio is None:
        raise MediaError(path, "no audio stream")
    with _WavDecoder(path, sample_rate=sample_rate, sample_format="flt") as wav:
        data = bytearray()
        for block in wav.blocks():
            data += block
    samples = np.frombuffer(data, np.float32).reshape(-1, wav.channels)
    if samples.shape[0] == 0:
        raise MediaError(path, "the audio stream decodes to no samples")
    return samples.mean(axis=1, dtype=np.float32) if mono else np.ascontiguousarray(samples.T)


class _WavDecoder:
    """Context manager: the first audio stream decoded to WAV on a pipe. `.channels`, `.sample_rate` and
    `.frame_bytes` come from the WAV header; `.blocks()` yields the sample data."""

    _CODECS = {"s16": ("pcm_s16le", 2), "flt": ("pcm_f32le", 4)}

    def __init__(self, path: Path, sample_rate: int | None, sample_format: str):
        codec, self._sample_bytes = self._CODECS[sample_format]
        options = {"acodec": codec, "map_metadata": -1, "fflags": "+bitexact"}
        if sample_rate is not None:
            options["ar"] = sample_rate
        spec = ffmpeg.output(ffmpeg.input(_file_url(path))["a:0"], "pipe:", format="wav", **options)
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


# --------------------------------------------------------------------------------------------------------
# Sizes: aspect-ratio buckets, resize to cover and centre crop
# --------------------------------------------------------------------------------------------------------

# (key, height, width). The key is the bucket's height / width, rounded to 2 decimals; a source picks the
# bucket whose key is nearest to its own height / width (first one on a tie), as the official code does.
# The "infinitetalk-*" tables are the official ASPECT_RATIO_627 / ASPECT_RATIO_960 (wan/utils/multitalk_utils.py),
# which its `size` 'infinitetalk-480' / 'infinitetalk-720' select.
_INFINITETALK_480 = (
    (0.26, 320, 1216), (0.38, 384, 1024), (0.50, 448, 896), (0.67, 512, 768), (0.82, 576, 704),
    (1.00, 640, 640), (1.22, 704, 576), (1.50, 768, 512), (1.86, 832, 448), (2.00, 896, 448),
    (2.50, 960, 384), (2.83, 1088, 384), (3.60, 1152, 320), (3.80, 1216, 320), (4.00, 1280, 320))
_INFINITETALK_720 = (
    (0.22, 448, 2048), (0.29, 512, 1792), (0.36, 576, 1600), (0.45, 640, 1408), (0.55, 704, 1280),
    (0.63, 768, 1216), (0.76, 832, 1088), (0.88, 896, 1024), (1.00, 960, 960), (1.14, 1024, 896),
    (1.31, 1088, 832), (1.50, 1152, 768), (1.58, 1216, 768), (1.82, 1280, 704), (1.91, 1344, 704),
    (2.20, 1408, 640), (2.30, 1472, 640), (2.67, 1536, 576), (2.89, 1664, 576), (3.62, 1856, 512),
    (3.75, 1920, 512))


def _with(table, *extra):
    return tuple(sorted(table + extra, key=lambda bucket: bucket[0]))


# "480p" / "720p" (the defaults): the official tables plus Wan2.1's native sizes 832x480 / 480x832 and
# 1280x720 / 720x1280, so that 16:9 and 9:16 sources get the resolution the model was trained at (the official
# 480 table alone gives a 16:9 source 896x448 and a 9:16 one 448x832). Other ratios get the official bucket.
BUCKETS: dict[str, tuple[tuple[float, int, int], ...]] = {
    "480p": _with(_INFINITETALK_480, (0.58, 480, 832), (1.73, 832, 480)),
    "720p": _with(_INFINITETALK_720, (0.56, 720, 1280), (1.78, 1280, 720)),
    "infinitetalk-480": _INFINITETALK_480,
    "infinitetalk-720": _INFINITETALK_720,
}


def choose_size(height: int, width: int,
                target: str | Sequence[tuple[int, int]] = "480p") -> tuple[int, int]:
    """(height, width) of the bucket for a source of height x width: the bucket whose height/width ratio is
    nearest to the source's. `target`: a name in BUCKETS, "WIDTHxHEIGHT" for one fixed size (e.g. "832x480"),
    or your own (height, width) sizes.

    "480p": landscape 16:9 -> (480, 832), portrait 9:16 -> (832, 480), square -> (640, 640), 4:3 -> (576, 704),
    3:4 -> (704, 576).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"source size must be positive, got {height}x{width}")
    if isinstance(target, str) and (fixed := re.fullmatch(r"(\d+)x(\d+)", target)):
        width_px, height_px = int(fixed[1]), int(fixed[2])
        if width_px % 16 or height_px % 16 or not width_px or not height_px:
            raise ValueError(f"size {target!r}: width and height must be positive multiples of 16 (VAE x DiT patch)")
        return height_px, width_px
    if isinstance(target, str):
        if target not in BUCKETS:
            raise ValueError(f"unknown size target {target!r}; known: {', '.join(BUCKETS)}, or WIDTHxHEIGHT")
        table = BUCKETS[target]
    else:
        table = tuple((h / w, h, w) for h, w in target)
    ratio = height / width
    _, bucket_h, bucket_w = min(table, key=lambda bucket: abs(bucket[0] - ratio))
    return bucket_h, bucket_w


def fit_to(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [3, H, W] or [T, 3, H, W] (floating point) to cover height x width, keeping the aspect ratio,
    and centre-crop to exactly that; the official resize_and_centercrop's geometry (scale = the larger of the
    two ratios, scaled size rounded up, crop offset round((scaled - target) / 2)). Resampling is bilinear
    with antialiasing (as PIL's bilinear, which the official uses for images)."""
    if not frames.is_floating_point():
        raise TypeError(f"fit_to expects floating-point frames, got {frames.dtype}")
    batch = frames[None] if frames.dim() == 3 else frames
    src_h, src_w = batch.shape[-2:]
    scale = max(height / src_h, width / src_w)
    # The 1e-6 keeps a product like 1080 * (480 / 1080) = 480.00000000000006 from rounding up to 481.
    scaled_h = max(height, math.ceil(src_h * scale - 1e-6))
    scaled_w = max(width, math.ceil(src_w * scale - 1e-6))
    if (scaled_h, scaled_w) != (src_h, src_w):
        batch = F.interpolate(batch.float(), size=(scaled_h, scaled_w), mode="bilinear", antialias=True,
                              align_corners=False).to(frames.dtype)
    top, left = round((scaled_h - height) / 2), round((scaled_w - width) / 2)
    batch = batch[..., top:top + height, left:left + width].contiguous()
    return batch[0] if frames.dim() == 3 else batch


# --------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------


def write_video(path: PathLike, frames: torch.Tensor | Iterable, fps: float = FPS,
                audio_path: PathLike | None = None, audio_start: float = 0.0, *, crf: int = 18,
                preset: str = "medium", audio_bitrate: str = "192k", chunk_frames: int = 16) -> int:
    """Encode frames to an MP4 at `path` (that name exactly, whatever its suffix): H.264 (libx264, yuv420p,
    BT.709 tagged) and, with `audio_path`, AAC of that file's first audio track from `audio_start` seconds on
    (the original audio at its own rate, not a 16 kHz copy; only >48 kHz is resampled to 48 kHz and >2
    channels downmixed to stereo). Returns the number of frames written.

    frames: a float tensor [T, 3, H, W] in [-1, 1], or an iterable of chunks, each a float tensor/array
    [t, 3, H, W] (or one frame [3, H, W]) in [-1, 1] or a uint8 array/tensor [t, H, W, 3] (or [H, W, 3]).
    Chunks are converted and written to ffmpeg's stdin one at a time; the encoded video only exists in the
    file. An odd width or height loses its last column/row (yuv420p needs even sizes).

    Durations: both streams are kept whole (no -shortest). Pass frames_for_duration(audio duration - audio_start)
    frames: the video then lasts N / fps, covering all of the audio and ending less than one frame after it;
    a count that misses that is written anyway, with a warning. On failure the partial file is removed and
    MediaError carries the tail of ffmpeg's stderr.
    """
    path = Path(path)
    chunks = _uint8_chunks(frames, chunk_frames)
    first = next(chunks, None)
    if first is None:
        raise MediaError(path, "no frames to write")
    height, width = first.shape[1] // 2 * 2, first.shape[2] // 2 * 2
    if height == 0 or width == 0:
        raise MediaError(path, f"frames of {first.shape[1]}x{first.shape[2]} are too small to encode")

    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    video = video.video.filter("scale", out_color_matrix="bt709", out_range="tv").filter("format", "yuv420p")
    streams = [video]
    options = {"format": "mp4", "vcodec": "libx264", "preset": preset, "crf": crf, "movflags": "+faststart",
               "colorspace": "bt709", "color_primaries": "bt709", "color_trc": "bt709", "color_range": "tv"}
    audio_left = None
    if audio_path is not None:
        audio, audio_options, audio_left = _aac_track(audio_path, audio_start, audio_bitrate)
        streams.append(audio)
        options.update(audio_options)

    proc = _FFmpeg(_command(ffmpeg.output(*streams, _file_url(path), **options)), path, stdin=True)
    written = 0
    try:
        for chunk in _chain(first, chunks):
            if chunk.shape[1:] != first.shape[1:]:
                raise MediaError(path, f"frame size changed from {first.shape[1:3]} to {chunk.shape[1:3]}")
            try:
                proc.proc.stdin.write(np.ascontiguousarray(chunk[:, :height, :width]).tobytes())
            except BrokenPipeError:
                proc.finish("encoding")  # ffmpeg died: raises with its message
                raise proc.failure("ffmpeg stopped reading frames") from None
            written += len(chunk)
        proc.finish("encoding")
    except BaseException:
        proc.kill()
        path.unlink(missing_ok=True)
        raise
    _check_durations(path, written, fps, audio_left)
    return written


def _aac_track(audio_path: PathLike, audio_start: float, bitrate: str) -> tuple[object, dict, float]:
    """The first audio track of `audio_path` from `audio_start` on, as an ffmpeg-python stream, the output
    options that encode it to AAC, and its duration in seconds (exact)."""
    audio = probe(audio_path).audio
    if audio is None:
        raise MediaError(audio_path, "no audio stream to put in the video")
    left = audio.duration - audio_start
    if left <= 0:
        raise MediaError(audio_path, f"audio_start {audio_start} s is past the end ({audio.duration:.3f} s)")
    source = ffmpeg.input(_file_url(audio_path), **({"ss": audio_start} if audio_start > 0 else {}))
    options = {"acodec": "aac", "audio_bitrate": bitrate}
    if audio.sample_rate > 48_000:
        options["ar"] = 48_000
    if audio.channels > 2:
        options["ac"] = 2
    return source["a:0"], options, left


def _check_durations(path: Path, frames: int, fps: float, audio_s: float | None) -> None:
    if audio_s is not None and abs(frames / fps - audio_s) > 1 / fps:
        log.warning("%s: %d frames last %.3f s but the audio lasts %.3f s (expected %d frames)", path,
                    frames, frames / fps, audio_s, frames_for_duration(audio_s, fps))


def concat_segments(segments: Sequence[PathLike], audio_path: PathLike | None, output: PathLike, *,
                    fps: float = FPS, audio_start: float = 0.0, audio_bitrate: str = "192k") -> int:
    """Join MP4 segments from write_video (same size, fps and encoder settings; their own audio, if any, is
    ignored) into an MP4 at `output`, the video stream-copied (no re-encoding), and mux `audio_path` as
    write_video does (AAC of the original track, both streams whole). Returns the number of frames; pass
    segments whose frames add up to frames_for_duration(audio duration) for a video that covers the audio."""
    output = Path(output)
    if not segments:
        raise MediaError(output, "no segments to join")
    # The concat demuxer reads its list from stdin; entries are absolute file: URLs (a relative name would be
    # resolved against "pipe:"), single-quoted with ' written as '\''.
    listing = "ffconcat version 1.0\n" + "".join(
        "file '{}'\n".format(_file_url(_require_file(s).resolve()).replace("'", "'\\''")) for s in segments)
    video = ffmpeg.input("pipe:", format="concat", safe=0, protocol_whitelist="file,pipe")["v:0"]
    streams, options, audio_left = [video], {"format": "mp4", "vcodec": "copy", "movflags": "+faststart"}, None
    if audio_path is not None:
        audio, audio_options, audio_left = _aac_track(audio_path, audio_start, audio_bitrate)
        streams.append(audio)
        options.update(audio_options)
    proc = _FFmpeg(_command(ffmpeg.output(*streams, _file_url(output), **options)), output, stdin=True)
    try:
        proc.proc.stdin.write(listing.encode())
        proc.finish("joining segments")
    except BaseException:
        proc.kill()
        output.unlink(missing_ok=True)
        raise
    frames = _count_packets(output)
    _check_durations(output, frames, fps, audio_left)
    return frames


def combine_audio(paths: Sequence[PathLike], audio_type: str, output: PathLike) -> Path:
    """Several speakers' original tracks as one file at `output`, for muxing: "para" plays them at once
    (summed, as the official sums its 16 kHz tracks, so loud overlaps can clip in an integer format; shorter
    ones padded with silence; rate and channels negotiated by ffmpeg's filters), "add" one after the
    other in the given order (the official "add" timeline: speaker 1 speaks, then speaker 2). The codec is
    ffmpeg's default for `output`'s suffix (.wav and .flac stay lossless; .m4a is AAC at 192 kb/s)."""
    output = Path(output)
    if audio_type not in ("para", "add"):
        raise ValueError(f"audio_type must be 'para' or 'add', got {audio_type!r}")
    if not paths:
        raise MediaError(output, "no audio tracks to combine")
    for path in paths:
        if _dump(path).audio is None:
            raise MediaError(path, "no audio stream")
    tracks = [ffmpeg.input(_file_url(path))["a:0"] for path in paths]
    if audio_type == "para":
        mixed = ffmpeg.filter(tracks, "amix", inputs=len(tracks), duration="longest", normalize=0)
    else:
        mixed = ffmpeg.concat(*tracks, v=0, a=1)
    spec = ffmpeg.output(mixed, _file_url(output), audio_bitrate="192k")
    proc = _FFmpeg(_command(spec), output)
    try:
        proc.finish("combining audio")
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return output


def _chain(first, rest):
    yield first
    yield from rest


def _uint8_chunks(frames, chunk_frames: int) -> Iterator[np.ndarray]:
    """Chunks of [t, H, W, 3] uint8 from the inputs write_video accepts."""
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        if frames.ndim == 3:
            frames = frames[None]
        parts = (frames[i:i + chunk_frames] for i in range(0, len(frames), chunk_frames))
    else:
        parts = iter(frames)
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach()
            if part.dtype != torch.uint8:
                part = part.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
                part = part.permute(*range(part.dim() - 3), -2, -1, -3)  # channels last
            part = part.cpu().numpy()
        elif part.dtype != np.uint8:
            part = np.rint((np.clip(part, -1, 1) + 1) * 127.5).astype(np.uint8)
            part = np.moveaxis(part, -3, -1)
        if part.ndim == 3:
            part = part[None]
        if part.ndim != 4 or part.shape[-1] != 3:
            raise ValueError(f"frames must be float [t, 3, H, W] in [-1, 1] or uint8 [t, H, W, 3]; got a chunk "
                             f"of shape {tuple(part.shape)}")
        yield part
