"""``python -m distlr`` / ``torchrun -m distlr``: the whole path on one screen.

arguments -> distributed session -> model, data, optimizer -> range test or series (wrap,
snapshot, range test, restore) -> result.json, plot and summary on rank 0 -> teardown (on every
path). Nothing heavy is imported before the arguments are parsed: ``--help`` and a bad flag
answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from distlr.cli.config import RunConfig
from distlr.cli.parse import config_file, parse_cli_sources
from distlr.dist.launch import launch_info

logger = logging.getLogger("distlr")

REPORT_FAILED = 3
"""The exit code of a run whose results are written but that a tracker (``--report-to``) could not take."""


def main(argv: list[str] | None = None, *, recorded: bool = False) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code.
    ``recorded``: a rank's uncaught error and its traceback reach torchrun's failure summary
    (torch elastic's ``record``; the console script asks for it)."""
    info = launch_info()
    try:
        cfg, launched = parse_cli_sources(argv)  # every rank parses the same flags, so every rank fails alike
    except (ValueError, TypeError) as err:
        return _fail(err, info is None or info.rank == 0)
    go = run
    if recorded:
        from torch.distributed.elastic.multiprocessing.errors import record

        go = record(run)
    return go(cfg, launched=launched, given=config_file(argv))


def run(cfg: RunConfig, *, launched: dict[str, Any], given: Path | None) -> int:
    """The run a parsed config asks for; the exit code (2 bad input, 1 a failure distlr explains,
    3 results written but a tracker failed, 130 Ctrl-C, 143 SIGTERM)."""
    import yaml

    from distlr.cli.build import (build, build_dataloader, build_trainable, check_activation_memory, output_dir,
                                  seed_everything, width_factory)
    from distlr.dist import collectives as D
    from distlr.dist.session import Session, start_session
    from distlr.dist.signals import Terminated, shielded
    from distlr.finder import LRFinder
    from distlr.output import files, trackers
    from distlr.output.plot import plot_series
    from distlr.output.summary import series_summary, summary

    info = launch_info()
    is_main = info is None or info.rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    if launched:
        logger.info("from accelerate launch (a flag or the YAML file overrides these): %s",
                    ", ".join(f"{k}={v}" for k, v in launched.items()))
    # DeepSpeed calls two collectives torch 2.13 deprecates, hundreds of times a range test.
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        warnings.filterwarnings("ignore", message=f"`torch.distributed.{name}` is deprecated", category=FutureWarning)
    session: Session | None = None
    code = 0
    made: Path | None = None  # an output directory this run created, removed again if left empty
    claim: files.Claim | None = None  # rank 0's hold on the output directory, for the whole run
    kept = (0, False)  # a series' runs already on disk, and whether that is all of them
    out_dir: Path | None = None
    try:
        session = start_session(cfg.device, dist_backend=cfg.dist_backend, dist_timeout=cfg.dist_timeout,
                                make_group=cfg.deepspeed is not None or cfg.fsdp, keep_group=cfg.deepspeed is not None)
        ctx, is_main = session.ctx, session.ctx.is_main
        report_to = trackers.parse(cfg.report_to)
        trackers.check(report_to)  # before anything runs, on every rank
        seed_everything(cfg.seed)
        out_dir, made, claim = output_dir(cfg, ctx, given)
        widths = cfg.width_list()
        built = build(cfg.model, seq_len=cfg.seq_len, width=None if widths is None else min(widths))
        loader, inputs = build_dataloader(cfg, built)
        val_loader = None if cfg.val_data is None else build_dataloader(cfg.for_data(cfg.val_data), built)[0]
        with D.agree_on_failure(ctx):
            check_activation_memory(cfg, built.model, ctx.device)
        if cfg.fsdp:
            from distlr.backends.fsdp import shard

            built.model = shard(built.model.to(ctx.device), ctx, amp=cfg.range_test.amp)
        optimizer, ds_config = build_trainable(cfg, built.model)
        with LRFinder(built.model, loader, optimizer, device=ctx.device, snapshot=cfg.snapshot,
                      snapshot_dir=cfg.snapshot_dir, find_unused_parameters=cfg.find_unused_parameters,
                      data_seed=cfg.seed, deepspeed_config=ds_config) as finder:
            if "sequences" in inputs and hasattr(finder.train_dataloader, "__len__"):
                inputs["sequences_per_rank"] = len(finder.train_dataloader) * cfg.batch_size
            cli = {"inputs": inputs, "notes": built.notes}  # what only the command line knows
            find_args = {**cfg.find_args(), "val_loader": val_loader, "progress": cfg.progress,
                         "log_every": cfg.log_every}
            saved = yaml.safe_dump(cfg.to_saved_dict(), sort_keys=False)
            if cfg.is_series:
                def keep(so_far: Any) -> None:  # each finished run reaches the disk: an interrupt loses none
                    nonlocal kept
                    # Shielded: an interrupt between the write and the count would report one run fewer
                    # than series.json holds (CI's SIGINT, sent the moment the second run was on disk).
                    with shielded():
                        if is_main:
                            files.write_atomic(out_dir / files.CONFIG_FILE, saved)
                            files.write_atomic(out_dir / files.SERIES_FILE, _series_json(so_far, cli))
                        kept = len(so_far.runs), len(so_far.runs) == so_far.planned

                series = finder.series(cfg.batch_sizes(), cfg.repeats, **find_args, on_run=keep,
                                       widths=widths, model_factory=None if widths is None else width_factory(cfg),
                                       num_steps_series=cfg.num_steps_list(), target_width=cfg.target_width,
                                       target_global_batch_size=cfg.target_global_batch_size)
                written = {files.SERIES_FILE: _series_json(series, cli)}
                report, draw = series_summary(series), lambda path: plot_series(series, path)
                figure = out_dir / files.SERIES_PLOT_FILE
            else:
                result = finder.find(**find_args)
                written = {files.RESULT_FILE: json.dumps({**result.to_dict(), "cli": cli}, indent=2, allow_nan=False)}
                if result.deepspeed_config is not None:
                    written[files.TUNED_DS_FILE] = json.dumps(result.deepspeed_config, indent=2)
                report, draw = summary(result, cli), lambda path: finder.plot(path)
                figure = out_dir / files.PLOT_FILE
            if is_main:
                written[files.CONFIG_FILE] = saved
                for name, text in written.items():
                    files.write_atomic(out_dir / name, text)
                draw(figure)
                print(report)
                print("wrote " + ", ".join(str(out_dir / name) for name in [*written, figure.name]))
                if not cfg.is_series:
                    reported = trackers.log(result, report_to, figure=figure, log_dir=out_dir)
                    for where in reported:
                        print("logged to " + where)
                    code = REPORT_FAILED if reported.failed else 0
        made = None  # the run wrote its results: the directory stays
    except (ValueError, TypeError, OSError, ImportError, D.RankFailure) as err:
        return _fail(err, is_main)  # what the user can fix by changing the command
    except D.DistlrError as err:  # a failure distlr explained: a rank lost, fp16 overflowing
        return _fail(err, True, code=1)  # each rank says what it saw
    except RuntimeError as err:
        if not D.is_out_of_memory(err):
            raise
        code = _fail(f"out of memory on rank {info.rank if info else 0} ({str(err).splitlines()[0][:200]}); use a "
                     f"smaller --batch-size (now {cfg.batch_size}) or --seq-len (now {cfg.seq_len}), and "
                     "--accumulation-steps to keep the global batch. What a range test had changed was put back",
                     True, code=1)
        _say_kept(kept, out_dir, is_main)
        return code
    except KeyboardInterrupt as err:
        if is_main:
            what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
            print(f"distlr: {what}; the model, optimizer and RNG state were put back", file=sys.stderr)
        _say_kept(kept, out_dir, is_main)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if claim is not None:
            claim.release()
        if made is not None:
            files.remove_if_empty(made)
        if session is not None:
            session.close()
    return code


def _series_json(series: Any, cli: dict[str, Any]) -> str:
    return json.dumps({**series.to_dict(), "cli": cli}, indent=2, allow_nan=False)


def _say_kept(kept: tuple[int, bool], out_dir: Path | None, is_main: bool) -> None:
    """After a series stopped part way: where its finished runs are."""
    from distlr.output.files import SERIES_FILE

    if is_main and kept[0] and not kept[1] and out_dir is not None:
        print(f"distlr: kept the {kept[0]} finished run(s) of the series in {out_dir / SERIES_FILE} "
              '("complete": false)', file=sys.stderr)


def _fail(err: BaseException | str, is_main: bool, *, code: int = 2) -> int:
    if is_main:
        print(f"distlr: error: {err}", file=sys.stderr)
    return code


def entry() -> int:
    """The console script and ``python -m distlr``."""
    code = main(recorded=True)
    if launch_info() is not None:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End a rank of a multi-process job now, everything written and flushed, without the
    interpreter's teardown. A process group still held at shutdown keeps its gloo threads
    running there, and one that frees the last collective's tensors needs the GIL, finds the
    interpreter finalizing and aborts the process ("terminate called without an active
    exception"), turning a finished run into a failed job. distlr's own hold on the group is
    gone (see ``distlr.dist.session``), but DeepSpeed's module globals and FSDP2's device mesh
    still hold theirs after ``destroy_process_group``."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(entry())
