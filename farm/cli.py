"""`talkfarm`: the command line. Hydra composes conf/ with the overrides given (`key=value`,
`group=option`; `talkfarm --help` lists them), farm.config.validate checks the values, farm.run renders.

Every config mistake, whether Hydra finds it (an unknown key, a wrong type, a missing option),
validate does (a value out of range) or farm.run does (a manifest it cannot read), ends the process
with status 1 and one line on stderr naming the key, before Ray starts or any model loads
(HYDRA_FULL_ERROR=1: Hydra's own report of composition errors, with its traceback).
"""

import os
import sys

import hydra
from hydra.errors import CompactHydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from farm.config import ConfigError, validate


@hydra.main(config_path="pkg://conf", config_name="config", version_base=None)
def _talkfarm(cfg: DictConfig) -> None:
    try:
        validate(cfg)
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
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Without it Hydra prints composition errors itself, over several lines; with it they reach us.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _talkfarm()
    except CompactHydraException as exc:
        if wants_traceback:
            raise
        sys.exit(f"talkfarm: {_one_line(exc)}")


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
