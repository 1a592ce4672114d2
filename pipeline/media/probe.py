"""Probing: stream facts from the stream dump `ffmpeg -i` prints, exact frame and sample counts.

ffprobe is never used (the imageio-ffmpeg wheel has none): exact counts come from running the stream
through ffmpeg (video packets copied to the null muxer, audio decoded to WAV on a pipe).
"""

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import ffmpeg

from pipeline.media.process import (MediaError, PathLike, _FFmpeg, _WavDecoder, _command, _input, _input_args,
                                    _passthrough, _require_file, _tidy, ffmpeg_binary)
from pipeline.job import FPS


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
    result = subprocess.run([ffmpeg_binary(), "-hide_banner", "-nostdin", *_input_args(path)],
                            capture_output=True, stdin=subprocess.DEVNULL)
    text = result.stderr.decode("utf-8", "replace")
    container = _INPUT_LINE.search(text)
    if container is None:
        if "Format not on whitelist" in text:
            raise MediaError(path, "ffmpeg finds a format outside the images, audio and video containers the farm "
                                   "reads (pipeline.media.process.INPUT_FORMATS): playlists and file lists, which make "
                                   "ffmpeg open other files, are refused")
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
    """The first video stream's packets (one per frame), one line each from the framecrc muxer. Not the
    null muxer's -progress count: ffmpeg before 7.1 reports no frames for a stream copy."""
    spec = ffmpeg.output(_input(path)["V:0"], "-", format="framecrc", c="copy")
    proc = _FFmpeg(_command(spec, "-nostats"), path, stdout=True)
    report = proc.proc.stdout.read().decode("ascii", "replace")
    proc.finish("counting video frames")
    return sum(1 for line in report.splitlines() if line and not line.startswith("#"))


def video_frame_count(path: PathLike, fps: float | None = FPS) -> int:
    """Number of frames read_video_frames(path, fps) returns: the video decoded through the same fps filter
    to the null muxer (exact, costs one decode). fps=None: the frames stored in the file (no decoding)."""
    path = _require_file(path)
    if _dump(path).video is None:
        raise MediaError(path, "no video stream")
    if fps is None:
        return _count_packets(path)
    stream = _input(path)["V:0"].filter("fps", fps=fps)
    spec = ffmpeg.output(stream, "-", format="null", **_passthrough(ffmpeg_binary()))
    return _progress_frames(path, spec, "counting video frames")
