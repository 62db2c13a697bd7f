"""``python -m distlr``: config -> model, data, optimizer -> range test -> result, plot, summary."""

from __future__ import annotations

import logging
import random
import sys

import numpy as np
import torch
import yaml

from distlr.build import build_dataloader, build_model, build_optimizer
from distlr.cli import parse_cli
from distlr.finder import LRFinder
from distlr.report import CONFIG_FILE, PLOT_FILE, RESULT_FILE, new_output_dir, summary, write_atomic

logger = logging.getLogger("distlr")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_cli(argv)
    except (ValueError, TypeError) as err:
        print(f"distlr: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _seed_everything(cfg.seed)

    try:
        out_dir = new_output_dir(cfg.output_dir, overwrite=cfg.overwrite)
        model = build_model(cfg.model, seq_len=cfg.seq_len)
        loader = build_dataloader(cfg, model)
        optimizer = build_optimizer(cfg, model)
        finder = LRFinder(model, loader, optimizer, device=cfg.device)
        logger.info("range test: lr %.1e -> %.1e over %d steps on %s", cfg.min_lr, cfg.max_lr, cfg.num_steps, finder.device)
        result = finder.find(**cfg.find_kwargs(), total_steps=cfg.total_steps, progress=cfg.progress,
                             log_every=cfg.log_every)
    except (ValueError, TypeError, FileExistsError, PermissionError, NotADirectoryError) as err:
        print(f"distlr: error: {err}", file=sys.stderr)
        return 2

    write_atomic(out_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_atomic(out_dir / RESULT_FILE, result.to_json())
    finder.plot(out_dir / PLOT_FILE)
    print(summary(result))
    print(f"wrote {out_dir / RESULT_FILE}, {out_dir / PLOT_FILE}, {out_dir / CONFIG_FILE}")
    return 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


if __name__ == "__main__":
    sys.exit(main())
