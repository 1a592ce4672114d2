"""`talkfarm dry_run=true`: every row checked as a run checks it (files, streams, durations, columns), and
the plan printed: per row its windows, seconds of video and what a run would do with it (render, resume,
render again and why, skip, refuse), then the totals and an estimate of the GPU time from the per-window
rates recorded in benchmarks/RESULTS.md for these presets. Nothing is written and no model is loaded.
"""

from dataclasses import dataclass
from importlib.resources import files

from omegaconf import DictConfig, OmegaConf

from farm.plan import RunPlan, expected_windows, plan_run
from pipeline.job import FPS, RenderSettings
from pipeline.media import choose_size
from pipeline.sampler import guidance_passes
from pipeline.windows import Window, frames_for_duration


@dataclass(frozen=True)
class Rate:
    """A steady 117-frame 832x480 window at 14B, measured: seconds per DiT forward, the rest of the window."""

    forward: float
    rest: float
    measured: str  # where and how: benchmarks/RESULTS.md has the run


# (memory, quant, attention) -> the rate. Only what was measured; a window of other frames, size, steps or
# guidance passes is scaled from it (the forward by its frames x pixels and count, the rest by frames).
RATES = {
    ("fast", "fp8", "int8fp8"): Rate(4.00, 1.51, "one H200, bench_farm through the CLI, 2026-12-03"),
    ("24gb", "fp8", "int8fp8"): Rate(4.00, 1.60, "one H200, bench_farm through the CLI (half a run), 2026-12-04"),
    ("fast", "none", "sdpa"): Rate(5.37, 3.83, "one H100, bench_window, 2026-11-22"),
    ("fast", "fp8", "sdpa"): Rate(4.55, 3.38, "one H100, bench_window, 2026-11-22"),
    ("24gb", "none", "sdpa"): Rate(5.46, 3.37, "one H100, bench_window, 2026-11-22"),
    ("24gb", "fp8", "sdpa"): Rate(4.60, 3.40, "one H100, bench_window, 2026-11-22"),
    ("12gb", "fp8_weights", "sdpa"): Rate(5.41, 8.46, "one H100, bench_window, 2026-11-22"),
}
MEASURED_FRAMES, MEASURED_PIXELS = 117, 832 * 480


def memory_preset(memory: DictConfig) -> str | None:
    """The conf/memory option whose values `memory` has; None where some were changed on the command line."""
    given = OmegaConf.to_container(memory, resolve=True)
    for entry in files("conf").joinpath("memory").iterdir():
        if entry.name.endswith(".yaml"):
            option = OmegaConf.to_container(OmegaConf.create(entry.read_text()))
            option.pop("defaults", None)
            if option == given:
                return entry.name.removesuffix(".yaml")
    return None


def window_seconds(rate: Rate, window: Window, settings: RenderSettings) -> float:
    height, width = choose_size(480, 832, settings.size)  # a landscape source: the buckets' areas are alike
    tokens = window.length * height * width / (MEASURED_FRAMES * MEASURED_PIXELS)
    forwards = settings.steps * len(guidance_passes(settings.text_scale, settings.audio_scale))
    return forwards * rate.forward * tokens + rate.rest * window.length / MEASURED_FRAMES


def dry_run(cfg: DictConfig) -> int:
    """Print the plan of the run `cfg` describes; 0 (a manifest that cannot be read raises ConfigError)."""
    print_plan(plan_run(cfg), cfg)
    return 0


def print_plan(plan: RunPlan, cfg: DictConfig) -> None:
    """The plan as a table of the rows (what a run would do with each), then the totals and the GPU time."""
    presets = (memory_preset(cfg.memory), cfg.quant.mode, cfg.attention.backend)
    rows = [(row, plan.row_settings(row), plan.actions[row.job.id]) for row in plan.rows]
    errors = plan.errors
    rate = RATES.get(presets)
    lines, windows_total, video_total, gpu_total = [], 0, 0.0, 0.0
    for row, settings, action in rows:
        if row.speech_seconds is None:  # on an object store: its duration is known at its encode
            lines.append((row.row, row.job.id, "?", "?", action))
            continue
        windows = expected_windows(row, settings)
        seconds = frames_for_duration(row.speech_seconds) / FPS
        lines.append((row.row, row.job.id, str(len(windows)), f"{seconds:.2f}", action))
        if action.startswith(("render", "resume")):
            windows_total += len(windows)
            video_total += seconds
            if rate is not None:
                gpu_total += sum(window_seconds(rate, window, settings) for window in windows)
    lines += [(error.row, error.id or "", "-", "-", f"refused: {error.reason}") for error in errors]
    lines.sort()
    header = ("row", "id", "windows", "video s", "a run would")
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(4)]
    for line in [header, *lines]:
        print("  ".join(str(value).ljust(width) for value, width in zip(line, widths)) + "  " + line[4])
    to_render = sum(1 for *_, action in rows if action.startswith(("render", "resume")))
    unknown = sum(1 for row, _, action in rows if row.speech_seconds is None and action.startswith(("render", "resume")))
    print(f"{len(rows) + len(errors)} rows: {to_render} to render ({windows_total} windows, {video_total:.1f} s of video"
          + (f"; {unknown} more of unknown length" if unknown else "") + f"), {len(rows) - to_render} skipped, "
          f"{len(errors)} refused")
    memory, quant, attention = presets
    if rate is None:
        print(f"GPU time: no rate recorded for memory={memory or '(changed)'} quant={quant} attention={attention} "
              f"(recorded: {', '.join(f'{m}/{q}/{a}' for m, q, a in RATES)})")
    else:
        print(f"GPU time: about {gpu_total / 3600:.2f} GPU-hours ({gpu_total / max(video_total, 1e-9):.1f} GPU-seconds "
              f"per second of video) at 14B with memory={memory} quant={quant} attention={attention}, from "
              f"{rate.forward:.2f} s per DiT forward and {rate.rest:.2f} s per window besides ({rate.measured})")
