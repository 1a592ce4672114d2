"""The whole farm as a user runs it: the `talkfarm` CLI on a manifest of mixed lengths, the GPU and host
memory sampled throughout, then what the run recorded read back into one summary.

    python benchmarks/bench_farm.py --weights /tmp/ckpt --memory fast --out DIR   # 14B (write_checkpoints.py set)
    python benchmarks/bench_farm.py --weights /tmp/ckpt --memory 24gb --out DIR
    python benchmarks/bench_farm.py --tiny --out DIR                              # the CPU smoke test

Manifest: 8 jobs of the demo picture and prompt, speech of 2, 3, 5, 8, 12, 16, 24 and 36 s (jobs/demo/
speech.wav looped and cut), a seed each: 31 windows of 117/25 (plan_windows, at the window lengths of the
command's composed config). The command, on a fresh storage.root (an old one would be resumed), is the
README's fastest: `python -m farm.cli model=infinitetalk_14b model.weights=W manifest=M sampler=distill
quant=fp8 attention=int8fp8 memory=MEMORY storage.root=DIR/run-MEMORY verbose=true` (verbose: the actors'
lines on the console as well as in the run's log). --tiny: 2 jobs of 2 and 6 s, the README's CPU demo
(preset=demo, memory=none): 8 windows of 33/9 on its CPU renderer.

Sampled: nvidia-smi every 100 ms (utilization, memory used; one GPU); every 0.5 s the summed VmRSS of the
CLI's process tree (the driver and its local Ray: gcs_server, raylet, workers; shared pages such as the
object store count once per process), the renderers' VmRSS and RssAnon, and its five largest processes. From results.parquet, the window
logs and the log, afterwards: device-seconds per video-second, whole run and steady (from the end of the
run's first window, over the frames later windows kept; devices as results.parquet counts them: 1 on one
GPU, the one renderer on a CPU); each window's seconds, stages, steps, peaks and host RSS, and medians
over steady full-length windows (each actor's first is warm-up); what the first window waited for (the
driver's first progress line, after ray.init; model loads; compile lines; the encode); the GPU's busy
fraction from the first window's start to the last's end, its idle gaps >= 0.5 s placed among the
windows; memory growth from the run's 5th window to its last, between full-length windows (host: the
tree's RSS, which falls as idle Ray workers exit, and the renderers' RSS and RssAnon, which leaves out the
object store's shared pages they touched); TORCH_LOGS=recompiles lines. Times are
seconds from the command's start: log lines by their own asctime where they have one (Ray forwards
workers' lines late), GPU samples by nvidia-smi's timestamp (a pipe may buffer them). MB: 10^6 bytes.

Writes DIR/farm-MEMORY.log (the CLI's output, each line after time.time() at read), samples-MEMORY.json
(raw GPU and RSS samples), bench-farm-MEMORY.json (the summary, however the run ends), inputs-MEMORY/.
Exits 1 if the command failed or a row is not done. --budget-s S: after S seconds the run gets SIGINT
(the CLI stores what it has and exits 130) and the windows rendered so far are reported.
"""

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import wave
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_module  # noqa: E402

from farm.config import render_settings  # noqa: E402
from farm.storage import RunStore  # noqa: E402
from farm.timings import STAGES  # noqa: E402
from pipeline.job import FPS, SAMPLE_RATE  # noqa: E402
from pipeline.media import read_audio  # noqa: E402
from pipeline.windows import frames_for_duration, plan_windows  # noqa: E402

DEMO = ROOT / "jobs" / "demo"
SPEECH_SECONDS = {"full": (2, 3, 5, 8, 12, 16, 24, 36), "tiny": (2, 6)}
MB = 1e6
# RAY_DEDUP_LOGS=0: Ray would fold one line from several workers into one ("[repeated 2x across
# cluster]"), hiding the loads, compiles and recompiles of all but the first.
CHILD_ENV = {"TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ASCTIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
WORKER = re.compile(r"\((\w+) pid=(\d+)\)")  # Ray's prefix on a worker's forwarded lines
LOADED = re.compile(r"checkpoints: loaded (.+?) from .* on (\S+): .*\(([\d.]+) s\)\s*$")  # log_loaded
COMPILED = re.compile(r"compiled DiT blocks in ([\d.]+) s for ")  # pipeline/kernels/compile.py, its inputs follow
COMPILE_SETUP = ("compile_blocks: ", "compile_vae: ")  # compile.py and models/vae.py, at load
WINDOW_KEYS = ("job", "window", "attempt", "actor", "started_s", "finished_s", "seconds", "length", "kept_frames",
               "stages", "unstaged", "steps", "peak_allocated", "peak_reserved", "host_rss_mb", "renderer_rss_mb",
               "renderer_anon_mb")  # per window, in the JSON


def farm_overrides(args, manifest: Path, root: Path) -> list[str]:
    # verbose=true: the actors' lines on the console too (loads, compiles, recompiles), which log_events reads
    if args.tiny:
        return [f"manifest={manifest}", "preset=demo", f"memory={args.memory}", f"storage.root={root}", "verbose=true"]
    return ["model=infinitetalk_14b", f"model.weights={args.weights}", f"manifest={manifest}", "sampler=distill",
            "quant=fp8", "attention=int8fp8", f"memory={args.memory}", f"storage.root={root}", "verbose=true"]


def window_lengths(overrides: list[str]) -> tuple[int, int]:
    """(frames, motion) of a window in the run settings the CLI makes of these overrides (farm/run.py)."""
    with initialize_config_module("conf", version_base=None):
        settings = render_settings(compose("config", overrides=overrides))
    return settings.window, settings.motion


def write_inputs(folder: Path, seconds: tuple[int, ...]) -> tuple[Path, dict[str, int]]:
    """Speech files of `seconds` (the demo speech looped, 16 kHz 16-bit WAV) and a manifest of one job each:
    (the manifest, each job's video frames). The picture is copied beside them: a manifest's media are
    read only from its folder unless inputs.allow names another."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO / "astronaut.png", folder / "astronaut.png")
    speech = read_audio(DEMO / "speech.wav", SAMPLE_RATE)
    prompt = json.loads((DEMO / "manifest.jsonl").read_text().splitlines()[0])["prompt"]
    rows, frames = [], {}
    for i, length in enumerate(seconds):
        job = f"speech-{length:02d}s"
        with wave.open(str(folder / f"{job}.wav"), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            samples = np.resize(speech, length * SAMPLE_RATE)  # repeats the array cyclically
            out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        rows.append({"id": job, "image": "astronaut.png", "audio": f"{job}.wav", "prompt": prompt,
                     "seed": 1000 + i})
        frames[job] = frames_for_duration(length)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest, frames


# ------------------------------------------------------------------------------------------- sampling


class LogTee(threading.Thread):
    """Echoes the CLI's output and writes it to `path`, each line after time.time() at read."""

    def __init__(self, stream, path: Path):
        super().__init__(daemon=True)
        self.stream, self.path, self.lines = stream, path, []  # lines: (time, text without ANSI colours)

    def run(self):
        with self.path.open("w") as log:
            for line in self.stream:
                now = time.time()
                sys.stdout.write(line)
                log.write(f"{now:.3f} {line}")
                log.flush()  # a run cut short keeps its log
                self.lines.append((now, ANSI.sub("", line.rstrip("\n"))))


class GpuSampler(threading.Thread):
    QUERY = ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-lms", "100"]

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.note, self.process = [], None, None
        if shutil.which("nvidia-smi") is None:
            self.note = "nvidia-smi is not on PATH: no GPU samples"
        else:
            self.process = subprocess.Popen(self.QUERY, stdout=subprocess.PIPE, text=True)

    def run(self):
        for line in self.process.stdout if self.process else ():
            now = time.time()
            try:
                stamp, util, used = (field.strip() for field in line.split(","))
                self.samples.append({"read": now, "t": datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp(),
                                     "util": float(util), "memory_used_mib": float(used)})
            except ValueError:  # "[N/A]", or a line cut short when nvidia-smi is stopped
                continue

    def stop(self):
        if self.process:
            self.process.terminate()
            self.process.wait()
        self.join()


def process_tree(root: int) -> list[tuple[int, str, int, int]]:
    """(pid, name, VmRSS kB, RssAnon kB) of `root` and every descendant, from /proc. RssAnon is the
    process's own memory, without the object store's shared pages it has touched."""
    children, names = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        pid, name_end = int(stat.parent.name), text.rindex(")")  # a name may hold spaces and parentheses
        names[pid] = text[text.index("(") + 1 : name_end]
        children.setdefault(int(text[name_end + 2 :].split()[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss, anon = (re.search(rf"^{key}:\s+(\d+) kB", status, re.M) for key in ("VmRSS", "RssAnon"))
        if rss and anon:  # kernel threads have none
            tree.append((pid, names.get(pid, "?"), int(rss.group(1)), int(anon.group(1))))
    return tree


class HostSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stopped = pid, [], threading.Event()

    def run(self):
        while not self.stopped.wait(0.5):
            tree = sorted(process_tree(self.pid), key=lambda p: -p[2])
            renderers = [p for p in tree if p[1].startswith("ray::Renderer")]
            self.samples.append({"t": time.time(), "rss_mb": sum(p[2] for p in tree) * 1024 / MB,
                                 "renderer_rss_mb": sum(p[2] for p in renderers) * 1024 / MB,
                                 "renderer_anon_mb": sum(p[3] for p in renderers) * 1024 / MB, "processes": len(tree),
                                 "largest": [[name, pid, round(kb * 1024 / MB, 1), round(anon * 1024 / MB, 1)]
                                             for pid, name, kb, anon in tree[:5]]})

    def stop(self):
        self.stopped.set()
        self.join()


# ------------------------------------------------------------------------------------------- analysis


def read_windows(store: RunStore, job_frames: dict[str, int], window: int, motion: int, t0: float) -> list[dict]:
    """Every window record of the run (a failed job's too) by finished time, with its job, its length, the
    frames it added to the video (pipeline/render.py's `keep`) and its seconds outside the stages."""
    records = []
    for job, frames in job_frames.items():
        plan = plan_windows(frames, window, motion)
        for r in store.read_window_log(job):
            w = plan[r["window"]]
            kept = min(w.new_frames, frames - w.start - w.new_from)
            records.append(r | {"job": job, "length": w.length, "kept_frames": kept,
                                "unstaged": r["seconds"] - sum(r["stages"].values()),
                                "started_s": r["started"] - t0, "finished_s": r["finished"] - t0})
    return sorted(records, key=lambda r: r["finished"])


def nearest(samples: list[dict], t: float) -> dict | None:
    i = bisect.bisect_left([s["t"] for s in samples], t)
    return min(samples[max(i - 1, 0) : i + 1], key=lambda s: abs(s["t"] - t), default=None)


def log_events(lines: list[tuple[float, str]], t0: float) -> dict:
    """What the log shows around the first windows; a pattern that never matches leaves its entry empty."""
    events = {"driver_ready_s": None, "loads": [], "renderers_ready_s": [], "compile": [], "recompile_lines": []}
    for read_at, text in lines:
        stamps = ASCTIME.findall(text)  # an actor's line: the driver's time of receipt, then the actor's own
        at = (datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp() if stamps else read_at) - t0
        worker = WORKER.search(text)
        pid = int(worker.group(2)) if worker else None
        if events["driver_ready_s"] is None and re.search(r"talkfarm: .*\| \d+ jobs to render", text):
            events["driver_ready_s"] = at  # the first progress line: ray.init has returned, actors are asked for
        if loaded := LOADED.search(text):
            events["loads"].append({"what": loaded.group(1), "device": loaded.group(2),
                                    "seconds": float(loaded.group(3)), "at_s": at, "pid": pid})
        if "pipeline.assemble: renderer on " in text:
            events["renderers_ready_s"].append(at)
        compiled = COMPILED.search(text)
        if compiled or any(setup in text for setup in COMPILE_SETUP):
            events["compile"].append({"at_s": at, "pid": pid, "seconds": float(compiled.group(1)) if compiled else None,
                                      "line": text[text.find("pipeline."):][:300]})
        if "[__recompiles]" in text or "Recompiling function" in text:  # TORCH_LOGS=recompiles, reasons included
            events["recompile_lines"].append({"at_s": read_at - t0, "line": text[:500]})
    events["recompiles"] = sum("Recompiling function" in e["line"] for e in events["recompile_lines"])
    return events


def where(start: float, end: float, windows: list[dict]) -> str:
    """[start, end] (absolute times) among the window log's windows."""
    def name(w: dict) -> str:
        return f"job {w['job']} window {w['window']}"

    inside = [w for w in windows if w["started"] < end and w["finished"] > start]
    if inside:
        return "inside " + ", ".join(map(name, inside))
    before = [w for w in windows if w["finished"] <= start]
    after = sorted((w for w in windows if w["started"] >= end), key=lambda w: w["started"])
    parts = ([f"after {name(before[-1])} finished"] if before else []) + ([f"before {name(after[0])}"] if after else [])
    return ", ".join(parts) or "no window ran"


def gpu_activity(samples: list[dict], windows: list[dict], t0: float) -> dict:
    if not samples or not windows:
        return {}
    first, last = min(w["started"] for w in windows), windows[-1]["finished"]
    busy = [s["util"] / 100 for s in samples if first <= s["t"] <= last]
    gaps, idle_from = [], None
    for sample in samples:
        if sample["util"] == 0 and idle_from is None:
            idle_from = sample["t"]
        elif sample["util"] > 0 and idle_from is not None:
            gaps.append((idle_from, sample["t"]))
            idle_from = None
    if idle_from is not None:  # idle to the end
        gaps.append((idle_from, samples[-1]["t"]))
    return {"busy_fraction": statistics.fmean(busy) if busy else None, "samples_in_interval": len(busy),
            "peak_memory_used_mib": max(s["memory_used_mib"] for s in samples),
            "idle_gaps": [{"start_s": a - t0, "end_s": b - t0, "seconds": b - a, "where": where(a, b, windows)}
                          for a, b in gaps if b - a >= 0.5]}


def analyse(store: RunStore, job_frames: dict[str, int], window: int, motion: int, t0: float, wall: float,
            lines, gpu, host) -> dict:
    results = store.read_results()
    windows = read_windows(store, job_frames, window, motion, t0)
    for w in windows:
        sample = nearest(host, w["finished"]) or {}
        w |= {key: sample.get(key.removeprefix("host_")) for key in ("host_rss_mb", "renderer_rss_mb", "renderer_anon_mb")}
    events = log_events(lines, t0)
    video_s = sum(w["kept_frames"] for w in windows) / FPS  # the done rows' durations; a cut run's windows too
    devices = sum({w["actor"]: w["devices"] for w in windows}.values())
    summary = {"wall_seconds": wall, "video_seconds": video_s, "windows": len(windows), "devices": devices,
               "rows_done": sum(r["status"] == "done" for r in results),
               "rows_not_done": {r["id"]: f"{r['status']}: {r.get('error')}" for r in results if r["status"] != "done"},
               # the whole run: from the command's start to its last window's end (a run cut short: where it stopped)
               "device_seconds_per_video_second": (windows[-1]["finished_s"] * devices / video_s) if video_s else None,
               "gpu": gpu_activity(gpu, windows, t0),
               "host_rss_peak_mb": max((s["rss_mb"] for s in host), default=None),
               "recompiles": events["recompiles"], "recompile_lines": events["recompile_lines"],
               "dit_compile_lines": [c for c in events["compile"] if c["seconds"] is not None]}
    if not windows:
        return summary
    first, last = windows[0], windows[-1]
    later_video_s = sum(w["kept_frames"] for w in windows[1:]) / FPS
    steady_s = last["finished"] - first["finished"]
    summary["steady"] = {"from_s": first["finished_s"], "seconds": steady_s, "video_seconds": later_video_s,
                         "device_seconds_per_video_second": steady_s * devices / later_video_s if later_video_s else None}
    steady, warmed_up = [], set()
    for w in windows:  # by finished time: an actor's first window carries its loads and compile warm-up
        if w["actor"] in warmed_up and w["length"] == window:
            steady.append(w)
        warmed_up.add(w["actor"])
    summary["steady_full_windows"] = {"count": len(steady), "frames": window}
    if steady:
        summary["steady_full_windows"] |= {
            "median_seconds": statistics.median(w["seconds"] for w in steady),
            "median_stages": {s: statistics.median(w["stages"].get(s, 0.0) for w in steady) for s in STAGES},
            "median_unstaged": statistics.median(w["unstaged"] for w in steady)}
    summary["stages_vs_windows"] = {"window_seconds": sum(w["seconds"] for w in windows),
                                    "stage_seconds": {s: sum(w["stages"].get(s, 0.0) for w in windows) for s in STAGES},
                                    "unstaged_seconds": sum(w["unstaged"] for w in windows)}
    row = next((r for r in results if r["id"] == first["job"]), {})
    summary["first_window"] = {"job": first["job"], "started_s": first["started_s"], "finished_s": first["finished_s"],
                               "seconds": first["seconds"], "stages": first["stages"],
                               "encode_seconds": row.get("encode_seconds"),
                               **{k: events[k] for k in ("driver_ready_s", "loads", "renderers_ready_s", "compile")}}
    # From the 5th window on, the first and the last full-length window: the same work, so what differs grew.
    full = [w for w in windows[4:] if w["length"] == window]
    if len(full) >= 2:
        fifth, final = full[0], full[-1]
        growth = summary["memory_growth_mb"] = {"from": f"{fifth['job']} window {fifth['window']}",
                                                "to": f"{final['job']} window {final['window']}", "windows": len(full)}
        for key, unit in (("peak_allocated", MB), ("peak_reserved", MB), ("host_rss_mb", 1), ("renderer_rss_mb", 1),
                          ("renderer_anon_mb", 1)):
            if fifth.get(key) is not None and final.get(key) is not None:  # the peaks: CUDA only
                growth[key.removesuffix("_mb")] = (final[key] - fifth[key]) / unit
    summary["per_window"] = [{k: w.get(k) for k in WINDOW_KEYS} for w in windows]
    return summary


def print_summary(summary: dict) -> None:
    s = json.loads(json.dumps(summary, default=str), parse_float=lambda text: round(float(text), 2))
    steady, full, first, gpu = (s.get(k) or {} for k in ("steady", "steady_full_windows", "first_window", "gpu"))
    loads = ", ".join(f"{load['what']} {load['seconds']} s" for load in first.get("loads", []))
    gaps = gpu.get("idle_gaps", [])
    gpu_text = s.get("gpu_note") or (f"busy {gpu.get('busy_fraction')}, {len(gaps)} idle gaps >= 0.5 s "
                                     f"({sum(g['seconds'] for g in gaps):.1f} s)")
    print(f"\nbench_farm memory={s['memory']}: returncode {s.get('returncode')}, {s.get('rows_done')} rows done, "
          f"not done: {s.get('rows_not_done')}\n"
          f"  {s.get('windows')} windows (planned {s['planned_windows']}), {s.get('video_seconds')} s of video in "
          f"{s.get('wall_seconds')} s; device-s per video-s {s.get('device_seconds_per_video_second')}, steady "
          f"{steady.get('device_seconds_per_video_second')} (from {steady.get('from_s')} s; {s.get('devices')} devices)\n"
          f"  steady {s['window']}-frame windows: {full.get('count')}, median {full.get('median_seconds')} s, "
          f"stages {full.get('median_stages')}, unstaged {full.get('median_unstaged')}\n"
          f"  first window done at {first.get('finished_s')} s: driver ready {first.get('driver_ready_s')} s, "
          f"loads [{loads}], encode {first.get('encode_seconds')} s, the window {first.get('seconds')} s\n"
          f"  GPU: {gpu_text}; host RSS peak {s.get('host_rss_peak_mb')} MB\n"
          f"  memory growth (MB) {s.get('memory_growth_mb')}; recompiles {s.get('recompiles')}, "
          f"DiT compile lines {len(s.get('dit_compile_lines', []))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the CPU demo's tiny model, 2 short jobs")
    parser.add_argument("--weights", help="model.weights: the checkpoint root (not with --tiny)")
    parser.add_argument("--memory", help="the memory preset (conf/memory/); default fast, none with --tiny")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--budget-s", type=float, help="stop the run (SIGINT) after this many seconds and report "
                        "the windows it rendered")
    args = parser.parse_args()
    if args.tiny == bool(args.weights):
        parser.error("give --weights, or --tiny")
    args.memory = args.memory or ("none" if args.tiny else "fast")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    seconds = SPEECH_SECONDS["tiny" if args.tiny else "full"]
    manifest, job_frames = write_inputs(out / f"inputs-{args.memory}", seconds)
    root = out / f"run-{args.memory}"
    shutil.rmtree(root, ignore_errors=True)  # the CLI would resume an old run, skipping its finished rows
    overrides = farm_overrides(args, manifest, root)
    window, motion = window_lengths(overrides)
    planned = sum(len(plan_windows(frames, window, motion)) for frames in job_frames.values())
    print(f"{len(seconds)} jobs of {seconds} s: {planned} windows of {window}/{motion}")
    assert args.tiny or planned >= 30, planned
    command = [sys.executable, "-m", "farm.cli", *overrides]
    summary = {"memory": args.memory, "tiny": args.tiny, "command": command, "planned_windows": planned,
               "window": window, "motion": motion, "speech_seconds": list(seconds)}
    gpu, host = GpuSampler(), None
    summary["gpu_note"] = gpu.note
    try:
        gpu.start()
        t0 = summary["command_started"] = time.time()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", env=os.environ | CHILD_ENV)
        tee, host = LogTee(child.stdout, out / f"farm-{args.memory}.log"), HostSampler(child.pid)
        tee.start()
        host.start()
        try:
            summary["returncode"] = child.wait(timeout=args.budget_s)
        except subprocess.TimeoutExpired:  # Ctrl-C, as a user would: the CLI stores what it has and exits 130
            summary["stopped_at_budget_s"] = args.budget_s
            child.send_signal(signal.SIGINT)
            summary["returncode"] = child.wait()
        wall = time.time() - t0
        tee.join()  # its last lines, and both samplers stopped: the analysis reads all three
        host.stop()
        gpu.stop()
        summary |= analyse(RunStore(str(root)), job_frames, window, motion, t0, wall, tee.lines, gpu.samples, host.samples)
    finally:
        for sampler in (host, gpu):
            if sampler and sampler.is_alive():
                sampler.stop()
        (out / f"samples-{args.memory}.json").write_text(json.dumps(
            {"t0": summary.get("command_started"), "gpu": gpu.samples, "host": host.samples if host else []}))
        (out / f"bench-farm-{args.memory}.json").write_text(json.dumps(summary, indent=1, default=str))
    print_summary(summary)
    print(f"wrote {out / f'bench-farm-{args.memory}.json'}")
    return 0 if summary["returncode"] == 0 and summary["rows_done"] == len(seconds) else 1


if __name__ == "__main__":
    sys.exit(main())
