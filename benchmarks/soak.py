"""A soak: many short rows through the `talkfarm` CLI on this machine's CPUs with the tiny model, watching
the memory and open files of every process of the run, then checking what the run left behind.

    python benchmarks/soak.py --rows 500 --out /tmp/soak

Manifest: `--rows` rows of the demo picture with 2-4 s of speech (twelve WAVs of the demo speech, looped
and cut), a seed each; every 25th row is bad, in turn: a missing file, an unknown column, speech shorter
than wav2vec2's window, a picture under the 64 px minimum, a path outside the manifest's folder. The
command is the tests' fast one: `talkfarm manifest=M storage.root=OUT/run output.size=64x64
window.frames=33 window.motion=9 sampler=distill`, with its own TMPDIR.

Sampled every 2 s from /proc: each process of the CLI's tree (the driver, its Ray, the actors) with its
VmRSS, RssAnon and open file descriptors. Reported per role (driver, Renderer, Encoder; the actors by their
Ray process titles): the least-squares slope from the time the first 10% of rows ended to the run's end,
per 100 rows ended, and the first and last values there.
Checked after the run: every good row done, its video's frame count as its speech asks; every bad row
failed with a one-line reason; no temporary file (`.*.tmp`) in the run root and nothing left in the run's
TMPDIR but Ray's session folder and Inductor's cache; each done row's folder holds only its window log; results.parquet holds
every row and no per-row results file is left. Writes OUT/soak.json (the summary and every sample) and
exits 1 if a check fails.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_farm import process_tree  # noqa: E402

from farm.storage import RunStore  # noqa: E402
from pipeline import media  # noqa: E402
from pipeline.job import SAMPLE_RATE  # noqa: E402
from pipeline.media import read_audio  # noqa: E402
from pipeline.windows import frames_for_duration  # noqa: E402

DEMO = ROOT / "jobs" / "demo"
FAST = ["output.size=64x64", "window.frames=33", "window.motion=9", "sampler=distill"]
BAD_EVERY = 25
ROLES = ("driver", "ray::Renderer", "ray::Encoder")


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def write_inputs(folder: Path, rows: int) -> tuple[Path, dict[str, int], set[str]]:
    """The manifest, each good row's expected frame count, and the bad rows' ids."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO / "astronaut.png", folder / "face.png")
    speech = read_audio(DEMO / "speech.wav", SAMPLE_RATE)
    lengths = np.linspace(2.0, 4.0, 12)
    for i, seconds in enumerate(lengths):
        write_wav(folder / f"speech-{i:02d}.wav", np.resize(speech, int(seconds * SAMPLE_RATE)))
    write_wav(folder / "short.wav", speech[:100])
    subprocess.run([media.ffmpeg_binary(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", "color=c=gray:size=32x32",
                    "-frames:v", "1", str(folder / "tiny.png")], check=True)
    outside = Path(tempfile.mkdtemp(prefix="soak-outside-"))
    shutil.copy(folder / "speech-00.wav", outside / "speech.wav")
    bad_kinds = [{"audio": "missing.wav"}, {"stpes": 4}, {"audio": "short.wav"}, {"image": "tiny.png"},
                 {"audio": str(outside / "speech.wav")}]
    records, frames, bad = [], {}, set()
    for row in range(rows):
        job = f"row-{row:04d}"
        speech_file = row % len(lengths)
        record = {"id": job, "image": "face.png", "audio": f"speech-{speech_file:02d}.wav", "seed": row}
        if row % BAD_EVERY == BAD_EVERY - 1:
            record |= bad_kinds[(row // BAD_EVERY) % len(bad_kinds)]
            bad.add(job)
        else:
            frames[job] = frames_for_duration(int(lengths[speech_file] * SAMPLE_RATE) / SAMPLE_RATE)
        records.append(record)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest, frames, bad


def open_files(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def role(pid: int, name: str, driver: int) -> str | None:
    if pid == driver:
        return "driver"
    return next((r for r in ROLES[1:] if name.startswith(r)), None)


class Sampler(threading.Thread):
    def __init__(self, driver: int):
        super().__init__(daemon=True)
        self.driver, self.samples, self.stopped = driver, [], threading.Event()

    def run(self):
        while not self.stopped.wait(2.0):
            now = time.time()
            for pid, name, rss_kb, anon_kb in process_tree(self.driver):
                if (r := role(pid, name, self.driver)) is not None:
                    self.samples.append({"t": now, "role": r, "pid": pid, "rss_mb": rss_kb / 1024,
                                         "anon_mb": anon_kb / 1024, "fds": open_files(pid)})

    def stop(self):
        self.stopped.set()
        self.join()


def slopes(samples: list[dict], ends: list[float], after: float) -> dict:
    """Per role and pid, from `after` on: least-squares slope per 100 rows ended of RSS, RssAnon and fds,
    with the first and last values."""
    report = {}
    for key in sorted({(s["role"], s["pid"]) for s in samples}):
        mine = [s for s in samples if (s["role"], s["pid"]) == key and s["t"] >= after]
        if len(mine) < 10:
            continue
        rows_ended = np.array([sum(end <= s["t"] for end in ends) for s in mine], dtype=float)
        entry = {"samples": len(mine)}
        for measure in ("rss_mb", "anon_mb", "fds"):
            values = np.array([s[measure] for s in mine if s[measure] is not None], dtype=float)
            x = rows_ended[: len(values)]
            slope = float(np.polyfit(x, values, 1)[0]) * 100 if np.ptp(x) > 0 else None
            entry[measure] = {"first": float(values[0]), "last": float(values[-1]),
                              "per_100_rows": None if slope is None else round(slope, 3)}
        report[f"{key[0]} pid {key[1]}"] = entry
    return report


def check(store: RunStore, root: Path, tmp: Path, frames: dict[str, int], bad: set[str]) -> list[str]:
    problems = []
    results = {r["id"]: r for r in store.read_results()}
    for job, expected in frames.items():
        row = results.get(job)
        if row is None or row["status"] != "done":
            problems.append(f"{job}: {row and row['status']} ({row and row['error']})")
        elif media.probe(row["output"]).video.frame_count != expected:
            problems.append(f"{job}: {media.probe(row['output']).video.frame_count} frames, not {expected}")
        elif sorted(p.name for p in (root / "jobs" / job).iterdir()) != ["windows"]:
            problems.append(f"{job}: left {sorted(p.name for p in (root / 'jobs' / job).iterdir())}")
    for job in bad:
        row = results.get(job)
        if row is None or row["status"] != "failed" or not row["error"] or "\n" in row["error"]:
            problems.append(f"{job}: expected a one-line failure, got {row}")
    problems += [f"temporary file left: {p}" for p in root.rglob(".*.tmp")]
    problems += [f"results file left: {p}" for p in (root / "results").glob("*")] if (root / "results").exists() else []
    # Ray's session folder and Inductor's compile cache (torchinductor_<user>) are meant to outlive a run
    problems += [f"left in TMPDIR: {p.name}" for p in tmp.iterdir() if p.name != "ray" and not p.name.startswith("torchinductor_")]
    if len(results) != len(frames) + len(bad):
        problems.append(f"results.parquet has {len(results)} rows, the manifest {len(frames) + len(bad)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    manifest, frames, bad = write_inputs(args.out / "inputs", args.rows)
    root = args.out / "run"
    tmp = Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))  # short: Ray puts its sockets there
    command = ["talkfarm", f"manifest={manifest}", f"storage.root={root}", *FAST]
    started = time.time()
    with (args.out / "talkfarm.log").open("w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"TMPDIR": str(tmp)})
        sampler = Sampler(driver.pid)
        sampler.start()
        code = driver.wait()
        sampler.stop()
    wall = time.time() - started
    store = RunStore(str(root))
    ends = sorted(r["finished"].timestamp() for r in store.read_results() if r["finished"] is not None)
    after = ends[len(ends) // 10] if ends else started
    problems = ([f"talkfarm exited {code}"] if code != 0 else []) + check(store, root, tmp, frames, bad)
    summary = {"command": command, "rows": args.rows, "good": len(frames), "bad": len(bad), "exit": code,
               "wall_seconds": round(wall, 1), "rows_per_minute": round(len(ends) / wall * 60, 2),
               "slopes_after_s": round(after - started, 1), "slopes": slopes(sampler.samples, ends, after),
               "problems": problems, "samples": sampler.samples}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
