"""Command-line interface: ``python -m benchmark {run,list,datasets,report,perf,sweep,worker}``.

Errors in options or config files print one line naming the option and exit with code 2;
unusable data exits 2, an output that cannot be written (disk full) 1. SIGTERM (a scheduler's
cancel) and Ctrl-C unwind like an exception (stages in flight are dropped, completed ones and
their rows kept), print one line and exit 143 and 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from benchmark.config import ConfigError, build_config, check_out_dir, load_yaml, show

logger = logging.getLogger(__name__)

#: Longest error line printed (values inside are already cut; this is a backstop).
MAX_ERROR_CHARS = 2000
RESUME_HINT = "completed stages are kept, re-run the same command to resume"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds exactly like Ctrl-C."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_run_options(p: argparse.ArgumentParser, launch: bool = False) -> None:
    # every default is None so that YAML values are only overridden by what the user typed
    p.add_argument("--config", help="a run YAML whose keys are these option names")
    p.add_argument(
        "--methods",
        nargs="+",
        help="all (default), names, globs ('cam*') or name[k=v,...]; see `list methods`",
    )
    p.add_argument("--dataset", help="synthetic (default) | oxford-pet")
    p.add_argument("--data-root", help="dataset folder (Oxford-IIIT Pet layout)")
    p.add_argument("--preset", help="paper | quick (default) | tiny")
    p.add_argument("--seeds", type=int, help="number of repetitions (default 1)")
    p.add_argument("--base-seed", type=int, help="seed every run seed derives from (default 0)")
    p.add_argument("--split", help="official (default) | weaktr_refinery")
    p.add_argument("--val-fraction", type=float, help="validation share of train (default 0.15)")
    p.add_argument("--budget-minutes", type=float, help="wall-clock cap per method run")
    p.add_argument("--max-epochs", type=int, help="epoch cap per training stage")
    p.add_argument("--segmenter-epochs", type=int, help="epochs of the shared segmenter")
    p.add_argument(
        "--segmenter-batch-size", type=int, help="batch size of the shared segmenter (preset's)"
    )
    p.add_argument(
        "--segmenter",
        help="lraspp | unet (default: the preset's; quick: U-Net on offline EfficientNet-Lite0)",
    )
    p.add_argument("--gt-ratio", type=float, help="share of train pseudo masks replaced by GT")
    p.add_argument("--threshold", type=float, help="fixed threshold instead of the val sweep")
    p.add_argument(
        "--threshold-on",
        help="val (default) | train_gt: the literature's protocol, flagged in every row",
    )
    p.add_argument("--convention", help="pet (default) | pet_with_border | weaktr_refinery")
    p.add_argument("--image-size", type=int, help="working resolution (default: the preset's)")
    p.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N | mps")
    p.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on CUDA")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="conv nets in channels_last memory format (default: on)",
    )
    p.add_argument("--out", help="output folder (default runs/default)")
    p.add_argument("--force", action="store_true", default=None, help="recompute every stage")
    p.add_argument(
        "--no-report", dest="report", action="store_false", default=None, help="skip the report"
    )
    if launch:
        _add_launch_options(p)


#: ``run`` options that say how a run is launched: never part of the RunConfig (nor its key).
LAUNCH_OPTIONS = (
    "launcher", "slurm_partition", "timeout_min", "gpus_per_job", "cpus_per_job", "mem_gb",
    "slurm_account", "sbatch_extra", "wait", "jobs",
)  # fmt: skip


def _add_launch_options(p: argparse.ArgumentParser) -> None:
    """``run --launcher none|local|slurm`` and the job options (see benchmark.launch)."""
    p.add_argument(
        "--launcher", choices=["none", "local", "slurm"],
        help="none (default): runs here, one after another; local / slurm: one submitit job "
        "per method and seed (local: on this machine; slurm: sbatch; --out on a shared disk)",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, metavar="N",
        help="at most N runs at once (without --launcher: local jobs on this machine, each "
        "with CPUs/N torch threads; slurm: the array's parallelism)",
    )  # fmt: skip
    p.add_argument("--slurm-partition", help="Slurm partition of the jobs")
    p.add_argument("--slurm-account", help="Slurm account charged for the jobs")
    p.add_argument("--timeout-min", type=int, help="job time limit, minutes (default 120)")
    p.add_argument("--gpus-per-job", type=int, help="GPUs per job")
    p.add_argument("--cpus-per-job", type=int, help="CPUs per job")
    p.add_argument("--mem-gb", type=float, help="memory per job, GB")
    p.add_argument(
        "--sbatch-extra", action="append", metavar="KEY=VALUE",
        help="extra sbatch flag (repeatable), e.g. qos=high, constraint=a100, requeue",
    )  # fmt: skip
    p.add_argument(
        "--no-wait", dest="wait", action="store_false", default=None,
        help="return once the jobs are submitted (build the report later: `report --out OUT`)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = _Parser(
        prog="python -m benchmark",
        description="wsss-bench: weakly-supervised segmentation methods under one evaluator, "
        "identical splits and equal budgets.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_run = sub.add_parser("run", help="run methods and references, store rows, write a report")
    _add_run_options(p_run, launch=True)

    p_list = sub.add_parser("list", help="list registered methods, datasets or presets")
    p_list.add_argument("what", choices=["methods", "datasets", "conventions", "splits"])

    p_data = sub.add_parser("datasets", help="dataset tools")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    p_check = data_sub.add_parser("check", help="report images found, usable, excluded, splits")
    p_check.add_argument("--dataset", default="oxford_pet")
    p_check.add_argument("--root", help="dataset folder")
    p_check.add_argument("--preset", default="quick", help="synthetic preset")
    p_check.add_argument("--json", action="store_true", help="print JSON")

    p_rep = sub.add_parser("report", help="rebuild report.md, tables and figures from rows")
    p_rep.add_argument("--out", default="runs/default", help="the run folder to read")
    p_rep.add_argument("--report-dir", help="where to write (default OUT/report)")

    sub.add_parser("perf", help="time hot paths against baselines (ratios)", add_help=False)
    _add_sweep_parsers(sub)
    return parser


def _add_sweep_parsers(sub: Any) -> None:
    """``sweep {threshold,gt-ratio,hparams}`` and ``worker`` (see benchmark.sweeps)."""
    p_sweep = sub.add_parser("sweep", help="Optuna sweeps: threshold, gt-ratio, hparams")
    kinds = p_sweep.add_subparsers(dest="sweep_kind", metavar="KIND", parser_class=_Parser)
    p_t = kinds.add_parser("threshold", help="per method x seed: val IoU vs threshold (Optuna)")
    p_g = kinds.add_parser("gt-ratio", help="grid over the share of train masks replaced by GT")
    p_h = kinds.add_parser("hparams", help="TPE over a method's search_space, pruned on val IoU")
    for p in (p_t, p_g, p_h):
        _add_run_options(p)
        p.add_argument("--study", help="study name (threshold: a prefix); default from the sweep")
        p.add_argument(
            "--storage", help="Optuna storage: SQLAlchemy URL or journal:PATH (default: the "
            "journal file OUT/studies/optuna.journal)",
        )  # fmt: skip
        p.add_argument("--sampler-seed", type=int, default=0, help="sampler seed (default 0)")
    p_t.add_argument("--trials", type=int, default=200, help="trials per study (default 200)")
    p_t.add_argument("--n-bins", type=int, default=1000, help="threshold grid (default 1000)")
    p_g.add_argument(
        "--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 1.0],
        help="gt ratios of the grid (default 0 0.1 0.2 0.3 0.4 1.0)",
    )  # fmt: skip
    p_g.add_argument(
        "--gt-rule", default="subset", choices=["subset", "weaktr_batch"],
        help="subset: a fixed nested subset gets GT (default); weaktr_batch: WeakTR-Refinery's "
        "max(1, int(r * batch)) GT images redrawn in every batch",
    )  # fmt: skip
    p_h.add_argument("--method", required=True, help="the method (name or name[k=v,...])")
    p_h.add_argument("--trials", type=int, default=20, help="trials of the study (default 20)")
    for p in (p_g, p_h):
        p.add_argument(
            "--launcher", default="none", choices=["none", "local", "slurm"],
            help="none: trials run here; local / slurm: submitit worker jobs",
        )  # fmt: skip
        p.add_argument("--workers", type=int, default=2, help="worker jobs for --launcher")
        p.add_argument("--slurm-partition", help="Slurm partition of the worker jobs")
        p.add_argument("--timeout-min", type=int, default=60, help="worker job time limit")
        p.add_argument("--gpus-per-node", type=int, help="GPUs per worker job")
        p.add_argument("--cpus-per-task", type=int, help="CPUs per worker job")

    p_w = sub.add_parser("worker", help="run trials of an existing study (any storage)")
    p_w.add_argument("--storage", required=True, help="the study's storage URL or journal:PATH")
    p_w.add_argument("--study", required=True, help="the study name")
    p_w.add_argument("--out", help="output folder (default: the one stored with the study)")
    p_w.add_argument("--trials", type=int, help="at most this many trials here")
    p_w.add_argument("--worker-index", type=int, default=0, help="offsets the sampler seed")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib", "fontTools", "optuna", "timm", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _cmd_list(what: str) -> int:
    if what == "methods":
        from methods import get_method, list_methods

        for name in list_methods():
            cls = get_method(name)
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            print(f"{name:18s} {cls.kind:9s} {doc[0] if doc else ''}")
    elif what == "datasets":
        from datasets import get_dataset, list_datasets

        for name in list_datasets():
            cls = get_dataset(name)
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"{name:14s} {doc[0] if doc else ''}")
    elif what == "conventions":
        from datasets import CONVENTIONS

        print("\n".join(CONVENTIONS))
    else:
        from datasets import SPLIT_SCHEMES

        print("\n".join(SPLIT_SCHEMES))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import datasets

    params: dict[str, Any] = {}
    if args.root:
        params["root"] = Path(args.root)
    if args.dataset.replace("-", "_") in ("synthetic", "synthetic_voc"):
        params["preset"] = args.preset
    try:
        ds = datasets.create_dataset(args.dataset, **params)
    except (datasets.DatasetError, KeyError) as exc:
        print(f"error: {exc}".strip(), file=sys.stderr)
        return 2
    info = ds.check()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    if callable(getattr(ds, "summary", None)):  # VOC: lists, label source, disagreements
        print(ds.summary())
        return 0
    print(f"dataset      {info['dataset']}  ({info['root']})")
    print(f"image files  {info['image_files']}")
    print(f"usable       {info['usable']}")
    print(f"classes      {info['num_classes']}: {', '.join(map(str, info['classes']))}")
    print(f"splits       {info['splits']}")
    print(f"excluded     {len(info['excluded'])}")
    for e in info["excluded"]:
        print(f"  - {e['name']} ({e['file']}): {e['reason']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from benchmark import runner

    cli = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "verbose", *LAUNCH_OPTIONS) and v is not None
    }
    options = _launch_options(args)
    yaml_values = load_yaml(args.config) if args.config else {}
    cfg = build_config(yaml_values, cli)
    if not runner.check_methods(cfg.methods, cfg.preset):  # fail fast on bad specs (exit 2)
        raise ConfigError(f"--methods: {show(cfg.methods)} names no method")
    if options.launcher != "slurm":  # a Slurm job checks its own device (a GPU node's)
        runner.resolve_device(cfg.device)
    check_out_dir(cfg.out)
    if options.launcher == "none":
        rows = runner.run(cfg)
    else:
        from benchmark.launch import launch_run, report_command

        launch = launch_run(cfg, options)
        print(f"{options.launcher} jobs: {' '.join(launch.job_ids)} (logs: {launch.folder})")
        if not options.wait:
            print(f"report once they end: {report_command(cfg)}")
            return 0
        if launch.failed:
            print(f"failed jobs: {' '.join(launch.failed)} (error rows stored; see their logs)")
        rows = launch.rows
    from reports import main_table_text, write_report

    print(main_table_text(rows, cfg.convention))
    if cfg.report:
        path = write_report(Path(cfg.out))
        print(f"\nreport: {path}")
    return 0


def _launch_options(args: argparse.Namespace) -> Any:
    """The validated :class:`benchmark.launch.LaunchOptions` of ``run`` (ConfigError if bad)."""
    from benchmark.launch import LaunchOptions, parse_sbatch_extra

    jobs = args.jobs
    default = "local" if isinstance(jobs, int) and jobs > 1 else "none"
    return LaunchOptions(
        launcher=args.launcher or default,
        jobs=jobs,
        partition=args.slurm_partition,
        timeout_min=args.timeout_min,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job,
        mem_gb=args.mem_gb,
        account=args.slurm_account,
        sbatch_extra=parse_sbatch_extra(args.sbatch_extra),
        wait=args.wait is not False,
    ).validate()


def _cmd_report(args: argparse.Namespace) -> int:
    from benchmark.store import ROWS
    from reports import write_report

    out = Path(args.out)
    rows = out / "results" / ROWS
    if not out.is_dir():
        raise ConfigError(f"--out: {out} is not a folder; give the --out of a `run` or `sweep`")
    if not rows.is_dir() or not any(rows.glob("*.parquet")):
        raise ConfigError(f"--out: no results in {out} (no {rows}/*.parquet); nothing to report")
    if args.report_dir:
        report_dir = check_out_dir(args.report_dir, "--report-dir")
    else:
        report_dir = check_out_dir(out / "report", "--out")
    path = write_report(out, report_dir)
    print(f"report: {path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from benchmark import runner, sweeps

    sweep_only = {
        "study", "storage", "sampler_seed", "trials", "n_bins", "ratios", "gt_rule", "method",
        "launcher", "workers", "slurm_partition", "timeout_min", "gpus_per_node",
        "cpus_per_task", "sweep_kind",
    }  # fmt: skip
    cli = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "verbose", *sweep_only) and v is not None
    }
    yaml_values = load_yaml(args.config) if args.config else {}
    cfg = build_config(yaml_values, cli)
    if args.sweep_kind is None:
        build_parser().parse_args(["sweep", "--help"])
    runner.resolve_device(cfg.device)
    if args.sweep_kind != "hparams" and not runner.expand_methods(cfg.methods):
        raise ConfigError(f"--methods: {show(cfg.methods)} names no method")
    check_out_dir(cfg.out)
    if args.sweep_kind == "threshold":
        summary = sweeps.sweep_threshold(
            cfg, args.trials, args.n_bins, args.storage, args.study, args.sampler_seed
        )
        cols = ["method_id", "repetition", "threshold", "val_iou", "test_iou"]
        cols += ["exhaustive_threshold", "iou_gap", "match", "trials", "search_s", "persist_s"]
        if "error" in summary:
            cols.append("error")
        table = summary.reindex(columns=cols)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"\nstudies: {Path(cfg.out) / 'studies'}")
        return 0
    slurm = {"timeout_min": args.timeout_min}
    for key in ("slurm_partition", "gpus_per_node", "cpus_per_task"):
        if getattr(args, key) is not None:
            slurm[key] = getattr(args, key)
    if args.sweep_kind == "gt-ratio":
        spec = sweeps.gt_ratio_spec(cfg, args.ratios, args.gt_rule, args.sampler_seed)
        name = args.study or f"gt_ratio-{cfg.dataset}-{cfg.preset}-{args.gt_rule}"
    else:
        spec = sweeps.hparams_spec(cfg, args.method, args.trials, 0, args.sampler_seed)
        name = args.study or f"hparams-{cfg.dataset}-{cfg.preset}-{spec.methods[0]}"
    study, _ = sweeps.start_study(spec, name, args.storage, args.launcher, args.workers, slurm)
    rows = sweeps.study_rows(cfg.out, name)
    if args.sweep_kind == "gt-ratio":
        table = sweeps.gt_ratio_table(rows, cfg.convention)
        print(table.to_string(float_format=lambda v: f"{v:.4f}") if not table.empty else rows)
    else:
        done = [t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"]
        print(f"{len(study.trials)} trials, {len(done)} complete")
        if done:
            print(f"best: value {study.best_value:.4f}, params {study.best_params}")
    print(f"\ntrials: {Path(cfg.out) / 'studies' / (sweeps.study_slug(name) + '.csv')}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from benchmark import sweeps

    n = sweeps.run_worker(args.storage, args.study, args.worker_index, args.out, args.trials)
    print(f"worker {args.worker_index}: {n} trials")
    return 0


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the chosen command; expected failures become one line and an exit code."""
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "list":
            return _cmd_list(args.what)
        if args.command == "datasets":
            if args.data_command != "check":
                parser.parse_args(["datasets", "--help"])
            return _cmd_check(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "sweep":
            return _cmd_sweep(args)
        if args.command == "worker":
            return _cmd_worker(args)
    except ConfigError as exc:
        _error(exc)
        return 2
    except Exception as exc:
        from benchmark.cache import OutputError
        from datasets import DatasetError

        if isinstance(exc, DatasetError):  # unusable data: one clear error, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OutputError):  # disk full, unwritable results: earlier ones intact
            print(f"error: {exc.strerror}", file=sys.stderr)
            return 1
        storage = getattr(args, "storage", None)
        if not storage:
            raise
        return _redacted_traceback(storage)
    parser.print_help()
    return 0


def _redacted_traceback(storage: str) -> int:
    """Print the traceback in flight with every secret of ``storage`` masked; exit code 1.

    An unexpected error while a storage URL is in use (a sweep or a worker) may quote it: a
    driver names the host it failed to reach, which holds part of a password with a raw ``@``.
    """
    import traceback

    from benchmark.config import redact

    masked = redact(traceback.format_exc(), storage)
    print(masked, file=sys.stderr, end="")
    return 1


def _error(exc: BaseException) -> None:
    """Print ``error: <message>`` on stderr, cut to :data:`MAX_ERROR_CHARS`."""
    text = str(exc)
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters)"
    print(f"error: {text}", file=sys.stderr)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: a second SIGTERM kills at once; the first unwinds like Ctrl-C."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def _interrupted(exc: KeyboardInterrupt) -> int:
    """One line for SIGTERM (exit 143) or Ctrl-C (exit 130) instead of a traceback."""
    if isinstance(exc, Terminated):
        print(f"\ninterrupted by SIGTERM; {RESUME_HINT}", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(f"\ninterrupted (Ctrl-C); {RESUME_HINT}", file=sys.stderr)
    return 128 + signal.SIGINT


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "perf":
        from benchmark import perf

        return perf.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _dispatch(parser, args)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
