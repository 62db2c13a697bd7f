"""``python -m distlr`` / ``torchrun -m distlr``: the whole path on one screen.

config -> distributed session -> model, data, optimizer -> range test (wrap, snapshot, sweep,
suggest, restore) -> result, plot and summary on rank 0 -> teardown (on every path).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.distributed.elastic.multiprocessing.errors import record

from distlr import distributed as D
from distlr import trackers
from distlr.build import build, build_dataloader, build_trainable
from distlr.cli import config_file, parse_cli_sources
from distlr.config import RunConfig
from distlr.finder import LRFinder
from distlr.plot import plot_sweep
from distlr.report import (CONFIG_FILE, PLOT_FILE, RESULT_FILE, SWEEP_FILE, SWEEP_PLOT_FILE, TUNED_DS_FILE,
                           new_output_dir, remove_if_empty, summary, sweep_summary, write_atomic)
from distlr.session import Session, launch_info, start_session
from distlr.signals import Terminated

logger = logging.getLogger("distlr")
BAD_INPUT = (ValueError, TypeError, OSError, ImportError, D.RankFailure)
"""What the user can fix by changing the command: exit 2 with the message, no traceback."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    info = launch_info()
    is_main = info is None or info.rank == 0
    try:
        cfg, launched = parse_cli_sources(argv)  # every rank parses the same flags, so every rank fails alike
    except (ValueError, TypeError) as err:
        return _fail(err, is_main)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    if launched:
        logger.info("from accelerate launch (a flag or the YAML file overrides these): %s",
                    ", ".join(f"{k}={v}" for k, v in launched.items()))
    # DeepSpeed calls two collectives torch 2.13 deprecates, hundreds of times a sweep; nothing
    # a user can act on.
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        warnings.filterwarnings("ignore", message=f"`torch.distributed.{name}` is deprecated", category=FutureWarning)

    session: Session | None = None
    made: Path | None = None  # an output directory this run created, removed again if left empty
    try:
        session = start_session(cfg.device, dist_backend=cfg.dist_backend, dist_timeout=cfg.dist_timeout,
                                for_deepspeed=cfg.deepspeed is not None, require_group=cfg.fsdp)
        ctx = session.ctx
        is_main = ctx.is_main
        report_to = trackers.parse(cfg.report_to)
        trackers.check(report_to)  # before anything runs, on every rank
        _seed_everything(cfg.seed)
        out_dir, made = _output_dir(cfg, ctx, config_file(argv))
        built = build(cfg.model, seq_len=cfg.seq_len)
        loader, inputs = build_dataloader(cfg, built)
        val_loader = None if cfg.val_data is None else build_dataloader(dataclasses.replace(cfg, data=cfg.val_data),
                                                                         built)[0]
        if cfg.fsdp:
            from distlr.backends.fsdp import shard

            built.model = shard(built.model.to(ctx.device), ctx, amp=cfg.sweep.amp)
        optimizer, ds_config = build_trainable(cfg, built.model)
        with LRFinder(built.model, loader, optimizer, device=ctx.device, snapshot=cfg.snapshot,
                      snapshot_dir=cfg.snapshot_dir, find_unused_parameters=cfg.find_unused_parameters,
                      data_seed=cfg.seed, deepspeed_config=ds_config) as finder:
            logger.info("range test: lr %.1e -> %.1e, %d steps, %d rank(s) on %s", cfg.sweep.min_lr,
                        cfg.sweep.max_lr, cfg.sweep.num_steps, ctx.world_size, ctx.device.type)
            if "sequences" in inputs and hasattr(finder.train_dataloader, "__len__"):
                inputs["sequences_per_rank"] = len(finder.train_dataloader) * cfg.batch_size
            if cfg.is_sweep:
                _run_sweep(cfg, finder, out_dir, inputs, val_loader)
                made = None
                return 0
            result = finder.find(**cfg.sweep.as_dict(), val_loader=val_loader, progress=cfg.progress,
                                 log_every=cfg.log_every)
            if ctx.is_main:
                result.inputs = inputs
                result.notes.extend(built.notes)
                write_atomic(out_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_saved_dict(), sort_keys=False))
                write_atomic(out_dir / RESULT_FILE, result.to_json())
                finder.plot(out_dir / PLOT_FILE)
                written = [out_dir / RESULT_FILE, out_dir / PLOT_FILE, out_dir / CONFIG_FILE]
                if result.deepspeed_config is not None:
                    written.append(write_atomic(out_dir / TUNED_DS_FILE, json.dumps(result.deepspeed_config, indent=2)))
                print(summary(result))
                print("wrote " + ", ".join(map(str, written)))
                for where in trackers.log(result, report_to, figure=out_dir / PLOT_FILE, log_dir=out_dir):
                    print("logged to " + where)
        made = None  # the run wrote its results: the directory stays
    except BAD_INPUT as err:
        return _fail(err, is_main)
    except D.DistlrError as err:  # a failure distlr explained: a rank lost, fp16 overflowing
        return _fail(err, True, code=1)  # each rank says what it saw
    except KeyboardInterrupt as err:
        if is_main:
            what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
            print(f"distlr: {what}; the model, optimizer and RNG state were put back", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if made is not None:
            remove_if_empty(made)
        if session is not None:
            session.close()
    return 0


def _run_sweep(cfg: RunConfig, finder: LRFinder, out_dir: Path, inputs: dict, val_loader: Any) -> None:
    """``--global-batch-sizes`` / ``--repeats``: every run in this job; sweep.json, sweep.png
    and config.yaml on rank 0."""
    find_args = cfg.sweep.as_dict()
    if cfg.global_batch_sizes is not None:
        find_args.pop("accumulation_steps")  # each size's split decides it (validate refused another value)
    sweep = finder.sweep(cfg.batch_sizes(), cfg.repeats, target_global_batch_size=cfg.target_global_batch_size,
                         **find_args, val_loader=val_loader, progress=cfg.progress, log_every=cfg.log_every)
    if not finder.ctx.is_main:
        return
    record = {**sweep.to_dict(), "inputs": inputs}
    write_atomic(out_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_saved_dict(), sort_keys=False))
    write_atomic(out_dir / SWEEP_FILE, json.dumps(record, indent=2, allow_nan=False))
    plot_sweep(sweep, out_dir / SWEEP_PLOT_FILE)
    print(sweep_summary(sweep))
    print("wrote " + ", ".join(str(out_dir / name) for name in (SWEEP_FILE, SWEEP_PLOT_FILE, CONFIG_FILE)))


def _output_dir(cfg: RunConfig, ctx: D.DistContext, given: Path | None) -> tuple[Path, Path | None]:
    """Rank 0 makes the output directory (never over an earlier result, never over the config
    file it was given) and tells the others; also the directory if rank 0 created it."""
    path, created = None, False
    with D.agree_on_failure(ctx):
        if cfg.output_dir is not None and given is not None and \
                (Path(cfg.output_dir) / CONFIG_FILE).resolve() == given.resolve():
            raise ValueError(f"--config {str(given)!r} is the config.yaml of output_dir={cfg.output_dir!r}, which "
                             "this run would write; choose another --output-dir (distlr never writes over the "
                             "file it was given)")
        if ctx.is_main:
            path, created = new_output_dir(cfg.output_dir, overwrite=cfg.overwrite)
    path = D.broadcast_object(ctx, path)
    return path, path if created and ctx.is_main else None


def _fail(err: BaseException, is_main: bool, *, code: int = 2) -> int:
    if is_main:
        print(f"distlr: error: {err}", file=sys.stderr)
    return code


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@record
def entry() -> int:
    """The console script and ``python -m distlr``: under torchrun, a rank's uncaught error and
    its traceback reach the job's failure summary (torch elastic's ``@record``)."""
    code = main()
    if launch_info() is not None:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End a rank of a multi-process job now, everything written and flushed, without the
    interpreter's teardown: there torch's C++ threads now and then abort the process
    ("terminate called without an active exception"), which turns a finished run into a failed
    job. Seen in the test suite's torchrun jobs (1 in 80 runs) and under the deepspeed launcher."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(entry())
