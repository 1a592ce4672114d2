"""`talkfarm`: the command line. Hydra composes conf/ with the overrides given (`key=value`,
`group=option`; `talkfarm --help` lists them), farm.config.validate checks the values, farm.run renders.

Every config mistake, whether Hydra finds it (an unknown key, a wrong type, a missing option),
validate does (a value out of range) or farm.run does (a manifest it cannot read), ends the process
with status 1 and one line on stderr naming the key, before Ray starts or any model loads
(HYDRA_FULL_ERROR=1: Hydra's own report of composition errors, with its traceback).
"""

import os
import sys
from importlib.resources import files

import hydra
from hydra.errors import CompactHydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from farm.config import ConfigError, key_notes, validate

# Each example runs as written from the repository root; the last two need what their comment says.
HELP = """\
talkfarm renders audio-driven talking video (InfiniteTalk on Wan2.1-I2V-14B) in bulk on Ray.

  talkfarm manifest=jobs/demo/manifest.jsonl preset=demo
  talkfarm job.image=jobs/demo/astronaut.png job.audio=jobs/demo/speech.wav job.prompt="A woman talks" preset=demo
  talkfarm manifest=jobs/demo/manifest.jsonl model=infinitetalk_14b model.weights=/weights memory=fast quant=fp8
  talkfarm manifest=s3://bucket/manifest.jsonl storage.root=s3://bucket/runs/1 cluster=address ...

The first two render on the CPU with the tiny test model (its video is noise: it shows the plumbing), on an
in-process Ray, into runs/manifest/ and runs/speech/. The third needs a GPU and the official weights in
/weights (README, Real use); the fourth a Ray cluster and an object store. Running a command again skips
what is done and resumes the rest where it stopped. A run's log is in logs/ under its run folder.

Groups (group=option; the option in use is marked *):
{groups}

Keys (key=value; shown with the value in use), for {choices}:
{keys}

`talkfarm model=infinitetalk_14b --help` shows the keys of that model; --hydra-help shows Hydra's own options.
"""


@hydra.main(config_path="pkg://conf", config_name="config", version_base=None)
def _talkfarm(cfg: DictConfig) -> None:
    try:
        validate(cfg)
        if cfg.dry_run:  # without Ray and the model code
            from farm.dryrun import dry_run as run
        else:
            from farm.run import run  # Ray and the models load only for a valid config
        code = run(cfg)  # which raises ConfigError too, for a manifest it cannot read
    except ConfigError as exc:
        # Exiting here, not raising: Hydra would add its own "Error executing job" line.
        sys.exit(f"talkfarm: {exc}")
    sys.exit(code)


def main() -> None:
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        # A sweep's runs would share one run root, and the second would find every row done.
        sys.exit("talkfarm: -m/--multirun is not supported: one command renders one batch; vary settings "
                 "per row in a manifest, or run talkfarm once per storage.root")
    if {"-h", "--help"} & set(sys.argv[1:]):
        try:
            print(_help([arg for arg in sys.argv[1:] if arg not in ("-h", "--help")]), end="")
        except CompactHydraException as exc:
            sys.exit(f"talkfarm: {_one_line(exc)}")
        sys.exit(0)
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Without it Hydra prints composition errors itself, over several lines; with it they reach us.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _talkfarm()
    except CompactHydraException as exc:
        if wants_traceback:
            raise
        sys.exit(f"talkfarm: {_one_line(exc)}")


def _help(overrides: list[str]) -> str:
    """HELP with the config groups and their options, and every key with its value as composed from
    `overrides` and its description from the schema (farm.config.key_notes)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("conf", version_base=None):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    chosen = OmegaConf.to_container(cfg.hydra.runtime.choices)
    del cfg.hydra
    groups = []
    for group in sorted(entry.name for entry in files("conf").iterdir() if entry.is_dir() and entry.name != "__pycache__"):
        options = sorted(entry.name.removesuffix(".yaml") for entry in files("conf").joinpath(group).iterdir()
                         if entry.name.endswith(".yaml"))
        groups.append(f"  {group}: " + ", ".join(f"{o}*" if o == chosen.get(group) else o for o in options))
    notes = key_notes(cfg)
    values = {key: OmegaConf.select(cfg, key) for key in notes}
    shown = {key: f"{key}={_shown(value)}" for key, value in values.items()}
    width = min(max(map(len, shown.values())), 44)
    keys = [f"  {shown[key]:<{width}}  {note}" for key, note in notes.items()]
    in_use = ", ".join(f"{g}={chosen[g]}" for g in ("model", "memory", "quant", "sampler") if chosen.get(g))
    return HELP.format(groups="\n".join(groups), choices=in_use, keys="\n".join(keys))


def _shown(value) -> str:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else str(value)


def _one_line(exc: CompactHydraException) -> str:
    """Hydra's composition error in one line: its first line (which names the override), then
    OmegaConf's reason or the options there are."""
    line = str(exc).splitlines()[0].rstrip(".")
    if isinstance(exc.__cause__, OmegaConfBaseException):
        return f"{line}: {exc.__cause__.msg.splitlines()[0]}"
    if isinstance(exc, MissingConfigException) and exc.options:
        return f"{line}; available: {', '.join(sorted(exc.options))}"
    return line


if __name__ == "__main__":
    main()
