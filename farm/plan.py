"""What a run will do with each row, worked out before anything is written or any model loads: the
manifest read and checked, the run root's earlier results, each row's fingerprint (farm/fingerprint.py)
against the one it was rendered with, and so whether it is rendered, resumed, rendered again or skipped.
farm.run renders by it; farm.dryrun prints it.
"""

import json
import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from farm.config import ConfigError, output_settings, render_settings, run_root
from farm.fingerprint import changed_parts, digest, fingerprints
from farm.manifest import ManifestError, ManifestRow, RowError, read_manifest, settings_for, single_job
from farm.storage import RunStore
from pipeline.job import RenderSettings
from pipeline.windows import Window, frames_for_duration, plan_windows


@dataclass
class RunPlan:
    rows: list[ManifestRow]  # the rows that can run ...
    errors: list[RowError]  # ... and those the manifest's checks refused
    settings: RenderSettings  # the run's; a row's own are settings_for(row, settings)
    store: RunStore
    results: dict[str, dict]  # the run root's results.parquet rows by id
    prints: dict[str, dict]  # each row's fingerprint now
    actions: dict[str, str]  # each row's: "render", "resume at window k", AGAIN + why, DONE, FAILED_FOR_GOOD

    def row_settings(self, row: ManifestRow) -> RenderSettings:
        return settings_for(row, self.settings)


def plan_run(cfg: DictConfig) -> RunPlan:
    """The plan of the run `cfg` describes. Raises ConfigError for a manifest that cannot be read (before the
    run root is made: nothing is left behind) and for a run root whose rows other settings made."""
    settings, root = render_settings(cfg), run_root(cfg)
    if cfg.manifest:
        try:
            rows, errors = read_manifest(cfg.manifest, settings, allow=cfg.inputs.allow, storage_root=root)
        except ManifestError as exc:  # a config value that cannot run: the CLI reports it in one line
            raise ConfigError(f"manifest: {exc}") from None
    else:
        rows, errors = single_job(OmegaConf.to_container(cfg.job), os.getcwd(), settings)
    store = RunStore(root)
    results = {r["id"]: r for r in store.read_results()}
    made_with = output_settings(cfg)
    prints = fingerprints(rows, digest(made_with))
    refuse_other_settings(cfg, store, results, prints, made_with)
    actions = {row.job.id: action(store, results.get(row.job.id), row, prints[row.job.id], cfg.retry_failed) for row in rows}
    return RunPlan(rows, errors, settings, store, results, prints, actions)


def expected_windows(row: ManifestRow, settings: RenderSettings) -> list[Window] | None:
    """The row's windows by its speech's duration as the manifest's check measured it; None where that is
    not known before the encode (a file on an object store). The encode's count is exact."""
    if row.speech_seconds is None:
        return None
    return plan_windows(frames_for_duration(row.speech_seconds), settings.window, settings.motion)


def refuse_other_settings(cfg, store: RunStore, results: dict, prints: dict, now: dict) -> None:
    """A run whose settings or model (`now`, output_settings) differ from those of the rows its run root
    holds stops here, in one line naming the keys (from the run root's config.yaml), unless rerender=true."""
    stale = [job for job, parts in prints.items()
             if results.get(job, {}).get("fingerprint") and json.loads(results[job]["fingerprint"])["settings"] != parts["settings"]]
    if not stale or cfg.rerender:
        return
    what = "other settings or another model"
    earlier = store.read_config()
    if earlier is not None:
        before = output_settings(OmegaConf.create(earlier))
        keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        what = ", ".join(f"{k}={before.get(k)} (now {now.get(k)})" for k in keys) or what
    raise ConfigError(f"storage.root: {len(stale)} rows of {store.url} were rendered with {what}; give a new "
                      "storage.root, or rerender=true to render them again with these settings")


# What a run does with a row (action); the dry run prints it.
DONE, FAILED_FOR_GOOD = "skip: done", "skip: failed for good in an earlier run (retry_failed=true renders it)"
AGAIN = "render again from nothing: "


def action(store: RunStore, earlier: dict | None, row: ManifestRow, now: dict, retry_failed: bool) -> str:
    """A row whose inputs, own fields or settings differ from what its stored windows and output were made
    from renders again from nothing (AGAIN + why); else it is skipped when it is done or failed for good,
    resumed where windows are stored, rendered otherwise."""
    if earlier is None or refused_by_checks(earlier):
        return "render"  # new, or refused by the manifest's checks last time: nothing was rendered
    before = json.loads(earlier["fingerprint"]) if earlier.get("fingerprint") else None
    if before != now:
        why = f"its {', '.join(changed_parts(before, now))} changed" if before else "it has no fingerprint (an earlier talkfarm)"
        return f"{AGAIN}{why} since it was rendered"
    if earlier["status"] == "done" and store.output_exists(row.output):
        return DONE
    if earlier["status"] == "failed" and earlier.get("retryable") is False and not retry_failed:
        return FAILED_FOR_GOOD
    try:
        stored = store.next_window(row.job.id)
    except Exception as error:  # noqa: BLE001 - its renderer meets the same error and fails the row with it
        return f"render (its stored state cannot be read: {type(error).__name__})"
    return f"resume at window {stored + 1}" if stored else "render"


def refused_by_checks(result: dict) -> bool:
    """A results row of a row the manifest's checks refused (it never reached a worker)."""
    return result["status"] == "failed" and result.get("retryable") is None
