"""Media I/O: probing, decoding and encoding, all through one ffmpeg executable.

    probe(path)                    -> MediaInfo: streams, exact frame and sample counts          (probe.py)
    read_image(path)               -> [3, H, W] float in [-1, 1]                                  (read.py)
    read_video_frames(path)        -> [T, 3, H, W] float in [-1, 1], resampled to 25 fps          (read.py)
    read_audio(path)               -> float32 samples, 16 kHz mono by default, from any container (read.py)
    choose_size(h, w) / fit_to     -> aspect-ratio bucket; resize to cover + centre crop          (sizes.py)
    write_video(path, frames, ...) -> H.264 (yuv420p) + AAC of the original audio                 (write.py)
    concat_segments / combine_audio -> join per-window segments (no re-encode) + audio; mix speakers (write.py)

process.py finds the executable (PATH, else imageio-ffmpeg's), builds the command lines and runs ffmpeg with
its stderr drained; every error is a MediaError, one line naming the file and the problem.

The names above are re-exported here and imported on first use, so that `from pipeline.media import
choose_size` (farm/config.py, at start-up) loads sizes.py alone, without ffmpeg-python, Pillow or torch.
"""

import importlib
import sys
import types

# Public name -> the module of this package that defines it.
_EXPORTS = {
    **dict.fromkeys(("MediaError", "PathLike", "ffmpeg_binary"), "process"),
    **dict.fromkeys(("AudioStream", "MediaInfo", "VideoStream", "probe", "video_frame_count"), "probe"),
    **dict.fromkeys(("WHITE", "iter_video_frames", "read_audio", "read_image",
                     "read_video_frames"), "read"),
    **dict.fromkeys(("BUCKETS", "choose_size", "fit_to"), "sizes"),
    **dict.fromkeys(("combine_audio", "concat_segments", "to_uint8_frames", "write_video"), "write"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule pipeline.media.probe would set this package's attribute `probe` to that module,
    hiding the function probe(); a submodule is not bound under a name this package exports."""

    def __setattr__(self, name: str, value) -> None:
        if not (isinstance(value, types.ModuleType) and name in _EXPORTS):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
