"""The encoders alone at full size (T5 5.7B in bf16, CLIP ViT-H, chinese-wav2vec2-base; write_checkpoints.py's
random set), on the CPU and on the GPU: where should the encoder actor run (memory.encoder_device)?

    python benchmarks/bench_encoders.py --weights /tmp/ckpt --threads 1 8 16 --out DIR   # the GPU too if there is one
    python benchmarks/bench_encoders.py --weights /tmp/tiny --tiny --threads 1 2 --out DIR   # the tiny widths

Per device (the GPU first): each model's load (load_models, one component at a time); the T5's two
prompts (the job's and the negative one, 512 tokens each), which a manifest pays once per distinct prompt;
then per job (the demo's picture and prompt, speech of 2, 12 and 36 s, as bench_farm.py writes them)
encode_job with the prompt cached (the encoder actor's CachedPrompts), as for every further row. On the
CPU once per --threads count, in that order (torch.set_num_threads; Ray starts an actor with one). Writes
the encoders (and VAE) into --weights first if they are missing. Writes DIR/bench-encoders.json after
each measurement.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_module  # noqa: E402

from bench_farm import write_inputs  # noqa: E402
from farm.actors import CachedPrompts  # noqa: E402
from farm.config import checkpoint_paths, model_spec, render_settings  # noqa: E402
from pipeline.job import Job  # noqa: E402
from pipeline.models.checkpoints import Models, load_models  # noqa: E402
from pipeline.render import encode_job  # noqa: E402
from write_checkpoints import write_encoders_and_vae  # noqa: E402

SPEECH_SECONDS = (2, 12, 36)
COMPONENTS = ("t5", "clip", "wav2vec")


def seconds(work) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(time.perf_counter() - started, 3)


def measure(models: Models, jobs: list[Job], settings, warm_up: bool) -> dict:
    """The T5's two prompts once (after one untimed pass if `warm_up`: CUDA's first call pays for its
    kernels; a CPU's does not, and at one thread a pass costs minutes), then each job's encode_job with the
    prompts cached, as the encoder actor runs a manifest that repeats its prompt (twice, the second timed)."""
    prompts = [jobs[0].prompt, jobs[0].negative_prompt]
    if warm_up:
        models.t5.encode(prompts)
    result = {"t5_two_prompts_s": seconds(lambda: models.t5.encode(prompts)), "encode_job_cached_prompt_s": {}}
    cached = Models(t5=CachedPrompts(models.t5), clip=models.clip, wav2vec=models.wav2vec)
    for job in jobs:
        encode_job(cached, job, settings)
        result["encode_job_cached_prompt_s"][job.id] = seconds(lambda: encode_job(cached, job, settings))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="a write_checkpoints.py folder (the encoders are written if missing)")
    parser.add_argument("--tiny", action="store_true", help="the tiny widths, where the encoders are written")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with initialize_config_module("conf", version_base=None):
        cfg = compose("config", overrides=["model=infinitetalk_14b", f"model.weights={args.weights}"])
    paths, precision, settings = checkpoint_paths(cfg), model_spec(cfg).precision, render_settings(cfg)
    if not paths.t5().exists():
        started = time.perf_counter()
        write_encoders_and_vae(Path(args.weights), args.tiny)
        print(f"wrote the encoders in {time.perf_counter() - started:.1f} s", flush=True)

    manifest, _ = write_inputs(out / "inputs", SPEECH_SECONDS)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    jobs = [Job(id=r["id"], audio=(str(manifest.parent / r["audio"]),), image=r["image"], prompt=r["prompt"]) for r in rows]

    summary = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "devices": {}}
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        loaded, load_s = {}, {}
        for name in COMPONENTS:
            started = time.perf_counter()
            loaded[name] = getattr(load_models(paths, precision, device, components=[name]), name)
            load_s[name] = round(time.perf_counter() - started, 3)
        models, result = Models(**loaded), {"load_s": load_s}
        summary["devices"][device] = result
        for threads in args.threads if device == "cpu" else [None]:
            if threads:
                torch.set_num_threads(threads)
            result[f"threads_{threads}" if threads else "gpu"] = measure(models, jobs, settings, warm_up=device == "cuda")
            (out / "bench-encoders.json").write_text(json.dumps(summary, indent=1))  # kept if a later one is cut short
            print(device, threads, json.dumps(result), flush=True)
        del models, loaded
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
