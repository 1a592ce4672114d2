"""Encoding and muxing: frames to H.264 + AAC, joining segments without re-encoding, mixing speakers' audio."""

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import ffmpeg
import numpy as np
import torch

from pipeline.media.probe import _count_packets, _dump, probe
from pipeline.media.process import MediaError, PathLike, _FFmpeg, _command, _file_url, _input, _require_file
from pipeline.job import FPS
from pipeline.windows import frames_for_duration

log = logging.getLogger(__name__)


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
    # Tag the frames themselves: the encoder takes each frame's own colour properties over the -color_*
    # options below, and scale sets only the matrix, so without this primaries and transfer are untagged.
    video = video.filter("setparams", color_primaries="bt709", color_trc="bt709", colorspace="bt709", range="tv")
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
    source = _input(audio_path, **({"ss": audio_start} if audio_start > 0 else {}))
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
    # Every segment is its own x264 encode, and one of 1 or 2 frames has no B-frames and so none of the
    # others' decode delay: copied as it is, its first frame's decode time jumps by that delay and the
    # frame before it lasts 3 frames (avg_frame_rate 1625/66). Decode times are restamped one frame
    # apart from the first; presentation times are kept (pts=PTS: unset, setts gives pts the dts formula).
    retime = f"setts=pts=PTS:dts=STARTDTS+N/({fps}*TB):duration=1/({fps}*TB)"
    streams, options, audio_left = [video], {"format": "mp4", "vcodec": "copy", "bsf:v": retime,
                                             "movflags": "+faststart"}, None
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
    tracks = [_input(path)["a:0"] for path in paths]
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


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """Float frames [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3], as write_video encodes them, on
    the frames' device."""
    frames = frames.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return frames.permute(*range(frames.dim() - 3), -2, -1, -3)  # channels last


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
                part = to_uint8_frames(part)
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
