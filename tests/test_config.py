"""The config tree and its checks: every group option composes and validates; unknown keys, wrong
types and bad values fail naming the key; the converters give the pipeline's dataclasses; the CLI
stops a bad config with one line before Ray starts. No Ray, no model loads."""

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from farm.cli import main
from farm.config import SETTINGS_KEYS, ConfigError, checkpoint_paths, precision, render_settings, run_root, validate
from pipeline.job import RenderSettings
from pipeline.models.checkpoints import CheckpointPaths, Precision
from pipeline.models.tiny import write_tiny_checkpoints

REPO = Path(__file__).resolve().parents[1]
ONE_JOB = ("job.audio=speech.wav", "job.image=face.png")


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_module("conf", version_base=None):
        return compose("config", overrides=list(overrides))


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(compose_config(*overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- groups

# Each option of each group, with values that show it was the one composed.
OPTIONS = {
    ("model", "tiny"): {"model.dir": "~/.cache/talkfarm/tiny", "model.precision.dit": "fp32", "model.device": "auto"},
    ("model", "infinitetalk_14b"): {
        "model.weights": "/weights", "model.wan_dir": "/weights/Wan2.1-I2V-14B-480P",
        "model.infinitetalk": "/weights/InfiniteTalk/single/infinitetalk.safetensors",
        "model.wav2vec_dir": "/weights/chinese-wav2vec2-base", "model.dit_file": None,
        "model.precision.dit": "bf16", "model.precision.clip": "fp16", "model.device": "auto",
    },
    ("quant", "none"): {"quant.mode": "none"},
    ("quant", "fp8_weights"): {"quant.mode": "fp8_weights"},
    ("quant", "fp8"): {"quant.mode": "fp8"},
    ("attention", "sdpa"): {"attention.backend": "sdpa"},
    ("attention", "int8fp8"): {"attention.backend": "int8fp8"},
    ("attention", "sage"): {"attention.backend": "sage"},
    ("attention", "auto"): {"attention.backend": "auto"},
    ("sampler", "unipc"): {"sampler.scheduler": "unipc", "sampler.steps": 40, "sampler.shift": 7.0,
                           "sampler.text_scale": 5.0, "sampler.audio_scale": 4.0},
    ("sampler", "euler"): {"sampler.scheduler": "euler", "sampler.steps": 40, "sampler.shift": 7.0,
                           "sampler.text_scale": 5.0, "sampler.audio_scale": 4.0, "sampler.apg": False},
    ("sampler", "distill"): {"sampler.scheduler": "flowmatch_distill", "sampler.steps": 4,
                             "sampler.text_scale": 1.0, "sampler.audio_scale": 1.0, "sampler.batched_guidance": False},
    ("sampler", "dpmpp_sde"): {"sampler.scheduler": "dpm++_sde", "sampler.steps": 6, "sampler.shift": 7.0,
                               "sampler.text_scale": 1.0, "sampler.audio_scale": 1.0},
    ("window", "default"): {"window.frames": 117, "window.motion": 25},
    ("cluster", "local"): {"cluster.mode": "local", "cluster.address": None, "cluster.renderers": None,
                           "cluster.encoders": 1, "cluster.max_retries": 3, "cluster.actor_failure_limit": 3,
                           "cluster.max_in_flight": None, "cluster.sp_degree": 1},
    ("cluster", "address"): {"cluster.mode": "address", "cluster.address": "auto", "cluster.encoders": 1,
                             "cluster.max_retries": 3},
    ("storage", "local"): {"storage.root": None},
    ("memory", "none"): {"memory.compile": False, "memory.offload": False, "memory.vae_tiling": None,
                         "memory.encoder_device": None, "quant.mode": "none"},
    ("memory", "fast"): {"memory.compile": True, "memory.offload": False, "memory.vae_tiling": None,
                         "memory.encoder_device": None, "quant.mode": "none"},
    ("memory", "24gb"): {"memory.compile": True, "memory.offload": True, "memory.offload_ahead": 2,
                         "memory.vae_tiling": None, "memory.encoder_device": "cpu", "quant.mode": "none"},
    ("memory", "12gb"): {"memory.compile": True, "memory.offload": True, "memory.offload_ahead": 1,
                         "memory.vae_tiling.tile_height": 256, "memory.encoder_device": "cpu",
                         "quant.mode": "fp8_weights"},
    ("preset", "demo"): {"model.precision.dit": "fp32", "sampler.scheduler": "flowmatch_distill", "output.size": "128x128",
                         "window.frames": 33, "window.motion": 9},
}


def test_every_option_on_disk_is_tested():
    on_disk = {(p.parent.name, p.stem) for p in (REPO / "conf").glob("*/*.yaml")}
    assert on_disk == set(OPTIONS)


@pytest.mark.parametrize("group, option", sorted(OPTIONS))
def test_each_option_composes_and_validates(group, option):
    cfg = compose_config(f"{group}={option}", *ONE_JOB)
    if (group, option) == ("quant", "fp8") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^quant\.mode: .*compute capability >= 8\.9"):
            validate(cfg)  # fp8 GEMMs on a machine that cannot run them: refused at start-up
    elif (group, option) == ("attention", "int8fp8") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^attention\.backend: .*needs a Hopper GPU"):
            validate(cfg)
    elif (group, option) == ("attention", "sage") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^attention\.backend: .*needs a CUDA GPU"):
            validate(cfg)
    elif group == "memory" and OmegaConf.select(cfg, "memory.offload") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^memory\.offload: block offload cannot run on cpu"):
            validate(cfg)  # block offload streams to a GPU: refused at start-up without one
    else:
        validate(cfg)
    for key, expected in OPTIONS[group, option].items():
        assert OmegaConf.select(cfg, key) == expected, key


# group=option as the documents write it: `attention=sage`, `memory=24gb`, ...
GROUPS = "|".join(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and not p.name.startswith("_"))
NAMED_OPTION = re.compile(rf"(?<![\w./-])({GROUPS})=([a-z0-9_]+)")  # not ray.io/cluster=talkfarm


def test_every_option_the_documents_name_exists():
    documents = [REPO / "README.md", REPO / "pyproject.toml", *(REPO / "docs").glob("*.md"), *(REPO / "k8s").rglob("*.yaml"),
                 *(REPO / "conf").rglob("*.yaml"), *(REPO / "benchmarks").glob("*.md")]
    named = {(str(document.relative_to(REPO)), *m.groups()) for document in documents
             for m in NAMED_OPTION.finditer(document.read_text())}
    help_text = subprocess.run([sys.executable, "-m", "farm.cli", "--help"], capture_output=True, text=True, cwd=REPO).stdout
    named |= {("--help", *m.groups()) for m in NAMED_OPTION.finditer(help_text)}
    assert {("pyproject.toml", "attention", "sage"), ("README.md", "memory", "24gb")} <= named  # the scan finds them
    missing = sorted(n for n in named if not (REPO / "conf" / n[1] / f"{n[2]}.yaml").is_file())
    assert missing == []


@pytest.mark.parametrize("model", ["tiny", "infinitetalk_14b"])
def test_the_help_lists_every_key_with_its_value_and_a_description_and_every_group_option(model):
    shown = subprocess.run([sys.executable, "-m", "farm.cli", f"model={model}", "--help"], capture_output=True, text=True,
                           cwd=REPO, check=True).stdout
    cfg = compose_config(f"model={model}")
    leaves = [key for key in _leaf_keys(OmegaConf.to_container(cfg))]
    assert "model.precision.dit" in leaves and ("model.dir" in leaves) == (model == "tiny")
    for key in leaves:
        line = re.search(rf"^  {re.escape(key)}=(\S*)\s+(.*)$", shown, re.M)
        assert line, f"{key} is not in the help"
        assert len(line.group(2).split()) >= 2, f"{key}: no description"  # from the schema's comment
    assert f"model: infinitetalk_14b{'*' * (model == 'infinitetalk_14b')}, tiny{'*' * (model == 'tiny')}" in shown
    for group in (p for p in (REPO / "conf").iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        assert re.search(rf"^  {group.name}: " + ", ".join(rf"{o}\*?" for o in options) + "$", shown, re.M), group.name


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_top_level_defaults():
    cfg = compose_config()
    assert cfg.manifest is None and cfg.job.audio is None and cfg.job.seed == 0 and cfg.job.audio_type == "para"
    assert dict(cfg.output) == {"size": "480p", "color_match": "mkl", "color_strength": 1.0, "crf": 18}


def test_the_defaults_are_the_pipelines():
    assert render_settings(compose_config(*ONE_JOB)) == RenderSettings()
    assert precision(compose_config("model=infinitetalk_14b", *ONE_JOB)) == Precision()


# ---------------------------------------------------------------------------------------------- keys and types


def composition_error(*overrides: str) -> Exception:
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(*overrides)
    return caught.value.__cause__


@pytest.mark.parametrize("override, key", [
    ("sampler.stepz=3", "sampler.stepz"),
    ("foo=1", "foo"),
    ("model.weights=/w", "model.weights"),  # a key of model=infinitetalk_14b, not of the default tiny
    ("model.precision.fp8=bf16", "model.precision.fp8"),
])
def test_unknown_key_fails_in_struct_mode(override, key):
    assert composition_error(override).full_key == key


@pytest.mark.parametrize("override, key", [
    ("+sampler.stepz=3", "sampler.stepz"),
    ("+foo=1", "foo"),
    ("+model.precision.fp8=bf16", "model.precision.fp8"),
])
def test_appended_unknown_key_fails_validation(override, key):
    # Hydra's `+` opens struct mode to append; validate refuses what the schema lacks.
    assert config_error(override, *ONE_JOB).startswith(f"{key}: not a key of")


@pytest.mark.parametrize("override, key", [
    ("sampler.steps=abc", "sampler.steps"),
    ("sampler.shift=fast", "sampler.shift"),
    ("sampler.apg=maybe", "sampler.apg"),
    ("cluster.renderers=1.5", "cluster.renderers"),
    ("window.frames=[117]", "window.frames"),
])
def test_wrong_type_fails_naming_the_key(override, key):
    assert composition_error(override).full_key == key


def test_a_removed_group_is_missing():
    assert config_error("~sampler", *ONE_JOB).startswith("sampler: Missing mandatory value")


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("overrides, key, says", [
    (["sampler.steps=0"], "sampler.steps", "positive integer"),
    (["sampler=distill", "sampler.steps=6"], "sampler.steps", "exactly 4 steps"),
    (["sampler.shift=0"], "sampler.shift", "positive number"),
    (["sampler.scheduler=nope"], "sampler.scheduler", "euler, flowmatch_distill, unipc, dpm++_sde"),
    (["window.frames=116"], "window.frames", "4n+1"),
    (["window.motion=24"], "window.motion", "4k+1"),
    (["window.motion=117"], "window.motion", "smaller than window"),
    (["output.color_match=nope"], "output.color_match", "mkl"),
    (["output.size=nope"], "output.size", "480p"),
    (["output.size=100x100"], "output.size", "multiples of 16"),
    (["output.crf=52"], "output.crf", "[0, 51]"),
    (["sampler.text_scale=nan"], "sampler.text_scale", "finite number"),
    (["output.color_strength=inf"], "output.color_strength", "finite number"),
    (["quant.mode=fp4"], "quant.mode", "fp8_weights"),
    (["attention.backend=nope"], "attention.backend", "sdpa"),
    (["cluster=address", "attention.backend=nope"], "attention.backend", "sdpa, sage, int8fp8, auto"),
    (["model.precision.dit=fp8"], "model.precision.dit", "bf16"),
    (["model=infinitetalk_14b", "model.precision.vae=int8"], "model.precision.vae", "fp32"),
    (["model.device=tpu"], "model.device", "auto, cuda, cpu"),
    (["cluster.mode=k8s"], "cluster.mode", "local, address"),
    (["cluster.address=auto"], "cluster.address", "cluster=address"),
    (["cluster=address", "cluster.address=null"], "cluster.address", "cluster=address"),
    (["cluster.renderers=0"], "cluster.renderers", "less than 1"),
    (["cluster.max_retries=-1"], "cluster.max_retries", "less than 0"),
    (["cluster.max_in_flight=0"], "cluster.max_in_flight", "less than 1"),
    (["model=infinitetalk_14b", "cluster.sp_degree=3"], "cluster.sp_degree", "40 heads do not divide by G = 3"),
    (["cluster=address", "model=infinitetalk_14b", "cluster.sp_degree=16"], "cluster.sp_degree",
     "40 heads do not divide by G = 16 ranks (use a G that divides 40: 1, 2, 4, 5, 8, 10, 20, 40)"),
    (["cluster.sp_degree=3"], "cluster.sp_degree", "4 heads do not divide by G = 3"),  # the tiny model's 4
])
def test_invalid_value_fails_naming_the_key(overrides, key, says):
    message = config_error(*overrides, *ONE_JOB)
    assert message.startswith(f"{key}: ")
    assert says in message


def test_every_render_setting_has_its_config_key():
    assert list(SETTINGS_KEYS) == [f.name for f in fields(RenderSettings)]
    cfg = compose_config(*ONE_JOB)
    for key in SETTINGS_KEYS.values():
        OmegaConf.select(cfg, key, throw_on_missing=True)  # a key of the schema


@pytest.mark.parametrize("model, degree", [("infinitetalk_14b", 8), ("infinitetalk_14b", 5), ("tiny", 2), ("tiny", 4)])
def test_an_sp_degree_that_divides_the_heads_is_valid(model, degree):
    validate(compose_config(f"model={model}", f"cluster.sp_degree={degree}", *ONE_JOB))


@pytest.mark.parametrize("overrides", [[], ["manifest=jobs/m.jsonl", "job.audio=speech.wav"]])
def test_exactly_one_of_manifest_and_job_audio(overrides):
    assert config_error(*overrides).startswith("manifest, job.audio: give exactly one")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_local_kernels_are_checked_on_this_machine():
    assert config_error("model.device=cuda", *ONE_JOB).startswith("model.device: cuda, but this machine has no")
    assert config_error("attention.backend=sage", *ONE_JOB).startswith("attention.backend: ")
    assert config_error("attention=int8fp8", *ONE_JOB).startswith("attention.backend: ")
    # A cluster's driver need not have the GPUs: there the actors check the kernel when they load.
    validate(compose_config("cluster=address", "model.device=cuda", "attention.backend=sage", *ONE_JOB))


def test_a_manifest_alone_is_valid():
    validate(compose_config("manifest=s3://bucket/jobs/batch.jsonl"))


def test_two_speakers_with_boxes_compose():
    cfg = compose_config(*ONE_JOB, "job.audio_2=b.wav", "job.boxes=[[0,0,320,480],[320.5,0,640,480]]")
    validate(cfg)
    assert cfg.job.boxes == [[0, 0, 320, 480], [320.5, 0, 640, 480]]


# ---------------------------------------------------------------------------------------------- converters


def test_render_settings():
    cfg = compose_config("sampler=dpmpp_sde", "window.frames=33", "window.motion=9", "output.size=832x480",
                         "output.color_match=none", "output.crf=23", "sampler.apg=true", *ONE_JOB)
    assert render_settings(cfg) == RenderSettings(
        window=33, motion=9, scheduler="dpm++_sde", steps=6, shift=7.0, text_scale=1.0, audio_scale=1.0, apg=True,
        batched_guidance=False, color_match="none", color_strength=1.0, size="832x480", crf=23,
    )


def test_tiny_model_paths_are_where_it_is_written(tmp_path):
    cfg = compose_config(f"model.dir={tmp_path / 'tiny'}", *ONE_JOB)
    paths = checkpoint_paths(cfg)
    assert not (tmp_path / "tiny").exists()  # the driver writes nothing: the actors write it where they run
    assert paths == write_tiny_checkpoints(tmp_path / "tiny")
    assert paths.infinitetalk.is_file() and (paths.wav2vec_dir / "config.json").is_file()
    assert paths.dit_files() and paths.t5().is_file() and paths.vae().is_file()
    assert precision(cfg) == Precision(dit="fp32", t5="fp32", clip="fp32", vae="fp32")


def test_official_layout_paths():
    cfg = compose_config("model=infinitetalk_14b", "model.weights=/w", "model.dit_file='~/comfy/dit_fp8.safetensors'",
                         "model.wav2vec_dir=/elsewhere/wav2vec", *ONE_JOB)
    assert checkpoint_paths(cfg) == CheckpointPaths(
        wan_dir=Path("/w/Wan2.1-I2V-14B-480P"),
        infinitetalk=Path("/w/InfiniteTalk/single/infinitetalk.safetensors"),
        wav2vec_dir=Path("/elsewhere/wav2vec"),
        dit_file=Path("~/comfy/dit_fp8.safetensors").expanduser(),
    )


@pytest.mark.parametrize("overrides, root", [
    (["manifest=s3://bucket/jobs/batch-7.jsonl"], "runs/batch-7"),
    (["manifest=jobs/demo.jsonl", "storage.root=s3://bucket/runs/r1"], "s3://bucket/runs/r1"),
    (["manifest=jobs/demo.jsonl", "storage.root=out/r2"], "out/r2"),
    ([*ONE_JOB, "job.id=anna"], "runs/anna"),
    (["job.audio=audio/speech-01.wav", "job.image=face.png"], "runs/speech-01"),
])
def test_run_root(overrides, root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = root if "://" in root else str(tmp_path / root)  # local roots come back absolute
    assert run_root(compose_config(*overrides)) == expected


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Run `talkfarm ARGS` in this process, in an empty directory: (exit status, stdout, stderr)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1; monkeypatch restores it after
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["talkfarm", *args])
        try:
            with pytest.raises(SystemExit) as caught:
                main()
        finally:
            GlobalHydra.instance().clear()
        out, err = capsys.readouterr()
        code = caught.value.code
        return (1, out, err + f"{code}\n") if isinstance(code, str) else (code, out, err)

    return run


@pytest.mark.parametrize("args, says", [
    (["sampler.stepz=3", *ONE_JOB], "Could not override 'sampler.stepz': Key 'stepz' not in 'SamplerConfig'"),
    (["+sampler.stepz=3", *ONE_JOB], "sampler.stepz: not a key of SamplerConfig (known: scheduler, steps, "),
    (["sampler.steps=abc", *ONE_JOB], "Error merging override sampler.steps=abc: Value 'abc' of type 'str' could"),
    (["model=nope", *ONE_JOB], "In 'config': Could not find 'model/nope'; available: infinitetalk_14b, tiny"),
    (["sampler.steps==3", *ONE_JOB], "Error parsing override 'sampler.steps==3'"),
    (["window.frames=116", *ONE_JOB], "window.frames: window must be 4n+1"),
    (["manifest=m.jsonl", *ONE_JOB], "manifest, job.audio: give exactly one"),
])
def test_cli_config_error_is_one_line(cli, args, says):
    code, out, err = cli(*args)
    assert code == 1 and out == ""
    assert err.startswith(f"talkfarm: {says}") and err.count("\n") == 1, err


def test_cli_refuses_multirun(cli, tmp_path):
    code, _, err = cli("-m", "sampler=euler,distill", *ONE_JOB)
    assert code == 1 and err.startswith("talkfarm: -m/--multirun is not supported") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # Hydra's launcher would have written multirun.yaml here


def test_cli_help(cli):
    code, out, _ = cli("--help")
    assert code == 0
    assert out.startswith("talkfarm renders")
    assert "model: infinitetalk_14b, tiny*" in out and "sampler: distill, dpmpp_sde, euler*" in out
    code, _, err = cli("sampler=eular", "--help")  # a mistake in what the help is asked for: one line
    assert code == 1 and err.startswith("talkfarm: In 'config': Could not find 'sampler/eular'") and err.count("\n") == 1


# As `talkfarm` runs: a fresh process, which reports on stdout as it exits whether Ray was imported.
CLI = (
    "import atexit, sys; atexit.register(lambda: print('ray imported:', 'ray' in sys.modules)); "
    "from farm.cli import main; main()"
)


@pytest.mark.parametrize("bad, says", [
    ("sampler.stepz=3", "talkfarm: Could not override 'sampler.stepz'"),  # found by Hydra
    ("window.frames=116", "talkfarm: window.frames: "),  # found by validate
])
def test_cli_stops_a_bad_config_before_ray(tmp_path, bad, says):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-c", CLI, bad, *ONE_JOB], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith(says) and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and "ray" not in done.stderr.lower()
    assert done.stdout == "ray imported: False\n"
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or .log files


def test_cli_stops_an_unreadable_manifest_in_one_line(tmp_path):
    manifest = tmp_path / "broken.jsonl"
    manifest.write_text('{"id": "a", "image": "face.png", "audio": "speech.wav"}\n{"id": "b",\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "farm.cli", f"manifest={manifest}"], check=False, cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"talkfarm: manifest: {manifest}: line 2: not valid JSON (Expecting property name " \
                          f"enclosed in double quotes, column 12)\n", done.stderr
    assert list(tmp_path.iterdir()) == [manifest]  # no run root (runs/broken) for a run that cannot start


def test_inputs_allow_names_folders_or_url_prefixes():
    assert config_error("manifest=m.jsonl", "inputs.allow=[/data,'']") == (
        "inputs.allow: an empty location would allow nothing; give a folder or a URL prefix")
    assert config_error("manifest=m.jsonl", "inputs.allow=[s3:///media]") == (
        "inputs.allow: 's3:///media' has no host or bucket: write scheme://host/path")
    with pytest.raises(ConfigCompositionException, match="inputs.allow=/data"):  # a list, not text
        compose_config("manifest=m.jsonl", "inputs.allow=/data")


def test_a_dry_run_prints_the_plan_without_ray_or_a_model_and_writes_nothing(tmp_path):
    """The demo manifest plus a row whose audio is missing: each row with its windows and seconds and what a
    run would do, the totals, and the GPU time at the rate recorded for the presets (one 117-frame window
    of 4 steps x 1 pass at memory=fast quant=fp8 attention=int8fp8 is 4 x 4.00 + 1.51 = 17.51 s, as
    measured); no run root is made and Ray is never imported."""
    manifest = tmp_path / "manifest.jsonl"
    demo = (REPO / "jobs" / "demo" / "manifest.jsonl").read_text().replace('"astronaut.png"', f'"{REPO}/jobs/demo/astronaut.png"')
    demo = demo.replace('"speech.wav"', f'"{REPO}/jobs/demo/speech.wav"')
    manifest.write_text(demo + '{"id": "lost", "image": "%s/jobs/demo/astronaut.png", "audio": "nope.wav"}\n' % REPO)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CLI, f"manifest={manifest}", "dry_run=true", "memory=fast", "quant=fp8",
                           "attention=int8fp8", "sampler=distill", "output.size=832x480", "cluster=address",
                           f"inputs.allow=[{REPO}/jobs/demo]"],  # the demo's files are outside the manifest's folder
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["row", "id", "windows", "video", "s", "a", "run", "would"]
    assert lines[1].split() == ["1", "astronaut", "1", "3.88", "render"]  # 97 frames: one window
    assert lines[2].split()[:5] == ["2", "astronaut-preview", "1", "3.88", "render"]
    assert lines[3].startswith("3    lost") and "refused: audio " in lines[3] and "nope.wav: no such file" in lines[3]
    assert lines[4] == "3 rows: 2 to render (2 windows, 7.8 s of video), 0 skipped, 1 refused"
    # a 97-frame window: 4 steps x 4.00 s x 97/117 + 1.51 x 97/117; the preview row's 8 steps twice the forwards
    one = 97 / 117 * (4 * 4.00 + 1.51)
    eight = 97 / 117 * (8 * 4.00 + 1.51)
    assert f"about {(one + eight) / 3600:.2f} GPU-hours ({(one + eight) / 7.76:.1f} GPU-seconds per second" in lines[5]
    assert lines[-1] == "ray imported: False"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]  # no runs/manifest/
