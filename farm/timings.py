"""A job's time per stage for results.parquet, summed from its window log (every window of every attempt
and run: the log is durable, so a job resumed in a later run is counted whole)."""

# The stages a window's record times, each a `<stage>_seconds` column: the device's, one after another
# (pipeline.timing.StageClock), then the segment's x264 encode and the renderer's store, which run on
# another thread while the device renders the next window.
DEVICE_STAGES = ("conditioning", "dit", "decode", "color", "to_host", "motion")
STAGES = (*DEVICE_STAGES, "segment", "store")


def job_timings(window_log: list[dict], duration: float) -> dict:
    """Columns of one finished job from its window records (RunStore.read_window_log) and its seconds
    of video: render_seconds (the windows' wall time), first_window_seconds (window 0's, from the job's
    start on its renderer: the conditioning encode and, on a fresh renderer, compile warm-up included),
    the stages' sums, and device_seconds_per_video_second (render seconds times the renderer's devices
    - GPUs, or actors on a machine without - per second of video)."""
    first = next((r for r in window_log if r["window"] == 0), None)
    columns = {
        "render_seconds": sum(r["seconds"] for r in window_log),
        "first_window_seconds": first["seconds"] if first else None,
        "device_seconds_per_video_second": sum(r["seconds"] * r["devices"] for r in window_log) / duration,
    }
    for stage in STAGES:
        columns[f"{stage}_seconds"] = sum(r["stages"].get(stage, 0.0) for r in window_log)
    return columns
