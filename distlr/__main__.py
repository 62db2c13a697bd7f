"""``python -m distlr`` / ``torchrun -m distlr``: the whole path on one screen.

config -> distributed session -> model, data, optimizer -> range test (wrap, snapshot, sweep,
suggest, restore) -> result, plot and summary on rank 0 -> teardown (on every path).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from distlr import distributed as D
from distlr.build import build_dataloader, build_model, build_trainable
from distlr.cli import parse_cli
from distlr.config import RunConfig
from distlr.finder import LRFinder
from distlr.report import CONFIG_FILE, PLOT_FILE, RESULT_FILE, TUNED_DS_FILE, new_output_dir, summary, write_atomic
from distlr.session import launch_info, start_session

logger = logging.getLogger("distlr")
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, D.RankFailure)


def main(argv: list[str] | None = None) -> int:
    info = launch_info()
    is_main = info is None or info.rank == 0
    try:
        cfg = parse_cli(argv)  # every rank parses the same flags, so every rank fails alike
    except (ValueError, TypeError) as err:
        return _fail(err, is_main)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    # DeepSpeed calls two collectives torch 2.13 deprecates, hundreds of times a sweep; nothing
    # a user can act on.
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        warnings.filterwarnings("ignore", message=f"`torch.distributed.{name}` is deprecated", category=FutureWarning)

    session = start_session(cfg.device, dist_backend=cfg.dist_backend, dist_timeout=cfg.dist_timeout,
                            for_deepspeed=cfg.deepspeed is not None)
    ctx = session.ctx
    try:
        _seed_everything(cfg.seed)
        out_dir = _output_dir(cfg, ctx)
        model = build_model(cfg.model, seq_len=cfg.seq_len)
        loader = build_dataloader(cfg, model)
        model, optimizer, ds_config = build_trainable(cfg, model, ctx)  # a DeepSpeed engine with --deepspeed
        with LRFinder(model, loader, optimizer, device=ctx.device, snapshot=cfg.snapshot,
                      snapshot_dir=cfg.snapshot_dir, find_unused_parameters=cfg.find_unused_parameters,
                      data_seed=cfg.seed, deepspeed_config=ds_config) as finder:
            logger.info("range test: lr %.1e -> %.1e, %d steps, %d rank(s) on %s", cfg.min_lr, cfg.max_lr,
                        cfg.num_steps, ctx.world_size, ctx.device.type)
            result = finder.find(**cfg.find_kwargs(), total_steps=cfg.total_steps, progress=cfg.progress,
                                 log_every=cfg.log_every)
            if ctx.is_main:
                write_atomic(out_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                write_atomic(out_dir / RESULT_FILE, result.to_json())
                finder.plot(out_dir / PLOT_FILE)
                written = [out_dir / RESULT_FILE, out_dir / PLOT_FILE, out_dir / CONFIG_FILE]
                if result.deepspeed_config is not None:
                    written.append(write_atomic(out_dir / TUNED_DS_FILE, json.dumps(result.deepspeed_config, indent=2)))
                print(summary(result))
                print("wrote " + ", ".join(map(str, written)))
    except USER_ERRORS as err:
        return _fail(err, ctx.is_main)
    finally:
        session.close()
    return 0


def _output_dir(cfg: RunConfig, ctx: D.DistContext) -> Path:
    """Rank 0 makes the output directory (never over an earlier result) and tells the others."""
    path, error = None, None
    if ctx.is_main:
        try:
            path = new_output_dir(cfg.output_dir, overwrite=cfg.overwrite)
        except OSError as err:
            error = err
    D.raise_if_any_failed(ctx, error)
    return D.broadcast_object(ctx, path)


def _fail(err: BaseException, is_main: bool) -> int:
    if is_main:
        print(f"distlr: error: {err}", file=sys.stderr)
    return 2


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


if __name__ == "__main__":
    sys.exit(main())
