"""The run's output folder: checked before anything loads, cleaned up after a killed run, and never lost: what
``--overwrite`` replaces stays in ``.previous-run`` until its successor has saved; nothing the tool did not write is
touched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import FinetuneConfig
from .errors import QloraGaError
from .fileio import atomic_write
from .log import distributed, say

LR_SEARCH = "lr_search.json"  # what --lr auto found
RESUMES = "resumes.jsonl"  # one line per --resume: from which checkpoint, and the settings it changed
RUN_MARKERS = ("run_config.yaml", "metrics.jsonl", "checkpoints", "adapter", "init_report.json")
#: everything a run writes into --output-dir (what --overwrite replaces; nothing else there is touched)
RUN_OUTPUTS = RUN_MARKERS + ("loss.png", "summary.json", "merged", "gguf", "tensorboard", "wandb", LR_SEARCH, RESUMES)
#: where --overwrite keeps the previous run until the new one has saved its first checkpoint
PREVIOUS_RUN = ".previous-run"
SET_ASIDE_DONE = ".complete"  # in PREVIOUS_RUN once every output of the old run is in it


def check_output_dir(cfg: FinetuneConfig) -> Path:
    """The output folder, checked before anything loads: a folder (or creatable), writable, and not another
    run unless --resume / --overwrite. What killed writes left there is cleaned up first (main process)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise QloraGaError(f"--output-dir '{out}' is a file: pass a folder")
    from .fileio import nearest_folder

    up = nearest_folder(out)
    if not up.is_dir():  # (mkdir would say only "Not a directory", after the gradient pass)
        raise QloraGaError(f"--output-dir '{out}' is under '{up}', which is a file: pass a folder")
    with distributed.main_first():  # (its error, if any, is every process's; the others look once it is done)
        if distributed.is_main():
            _writable(out)
            _recover(out)
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise QloraGaError(f"--output-dir '{out}' already holds a run: pass --resume to continue it, --overwrite to replace it, or another --output-dir")
    return out


def _writable(out: Path) -> None:
    """Write (and remove) a file in ``out``, or in the folder it would be created in, now: rather than find out
    after the gradient pass and training. Nothing is left behind."""
    from .fileio import nearest_folder, probe_write

    try:
        probe_write(nearest_folder(out))
    except OSError as e:
        raise QloraGaError(f"--output-dir '{out}' cannot be written ({e.strerror or e}): pass a folder you can write to") from None


def _recover(out: Path) -> None:
    """Clean up after a run that was killed: temporary files of unfinished writes, and a previous run that
    --overwrite set aside (back in place when the new run saved nothing, deleted when it did)."""
    import re

    from .fileio import clean_stale
    from .train import CHECKPOINTS

    def run_output(name):  # only what a run writes there: other files in --output-dir are not the tool's
        return name in RUN_OUTPUTS

    def checkpoint(name):
        return re.fullmatch(r"step-\d+", name) is not None

    for folder, ours in ((out, run_output), (out / CHECKPOINTS, checkpoint), (out / PREVIOUS_RUN, run_output),
                         (out / PREVIOUS_RUN / CHECKPOINTS, checkpoint)):
        for what in clean_stale(folder, ours):
            say(f"note: {what} in {folder} (left by an interrupted write)")
    if (out / PREVIOUS_RUN).is_dir():
        if not (out / PREVIOUS_RUN / SET_ASIDE_DONE).is_file():  # killed while setting it aside: nothing new yet
            restore_previous(out, complete=False)
            say(f"note: put back the run in {out} that an interrupted --overwrite was setting aside")
        elif _saved_anything(out):
            shutil.rmtree(out / PREVIOUS_RUN)
            say(f"note: removed the run that --overwrite replaced in {out} (its successor had saved a checkpoint)")
        else:
            restore_previous(out)
            say(f"note: put back the run in {out} that an interrupted --overwrite had set aside")


def _saved_anything(out: Path) -> bool:
    from .train import CHECKPOINTS, checkpoint_folders

    return bool(checkpoint_folders(out / CHECKPOINTS)) or (out / "adapter").is_dir()


def set_aside_previous(out: Path) -> bool:
    """--overwrite: move the old run's outputs into ``out/.previous-run`` (same filesystem: renames), then mark
    the move complete (a start after a kill before the mark puts everything back, see :func:`_recover`)."""
    present = [m for m in RUN_OUTPUTS if (out / m).exists()]
    if not present:
        return False
    (out / PREVIOUS_RUN).mkdir()
    for m in present:
        os.replace(out / m, out / PREVIOUS_RUN / m)
    atomic_write(out / PREVIOUS_RUN / SET_ASIDE_DONE, "")
    return True


def restore_previous(out: Path, complete: bool = True) -> None:
    """Undo :func:`set_aside_previous`: the new run's outputs are removed and the old run's put back. When the
    set-aside did not complete, no new output exists yet: what is still in ``out`` is the old run's and stays."""
    prev = out / PREVIOUS_RUN
    for m in RUN_OUTPUTS:
        p = out / m
        if p.exists() and ((prev / m).exists() or complete):  # the old run's version wins
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if (prev / m).exists():
            os.replace(prev / m, p)
    shutil.rmtree(prev)


def drop_previous(out: Path) -> None:
    if distributed.is_main() and (out / PREVIOUS_RUN).is_dir():
        shutil.rmtree(out / PREVIOUS_RUN)


def write_json(path: Path, obj):
    atomic_write(path, json.dumps(obj, indent=1, default=str))
