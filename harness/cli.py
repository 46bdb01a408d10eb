"""Command line: ``harness run-study | tune | benchmark | status | report | export | leaderboard | bench | methods | data download``.

Every user error (bad study file, unknown method, missing data root, ...) is printed as one line
``harness: error: ...`` with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from harness.errors import HarnessError


def _cmd_run_study(args: argparse.Namespace) -> int:
    if args.estimate:
        if args.dry_run:
            raise HarnessError("--estimate and --dry-run: give one of them")
        if args.backend != "local":
            raise HarnessError(f"--estimate: estimates the local pool only; drop --backend {args.backend}")
        from harness.estimate import run_estimate  # imports torch itself, timed as the runner's start-up

        return run_estimate(args.study, workers=args.workers, tracking_uri=args.tracking_uri)
    from harness.runner import run_study

    return run_study(
        args.study, tracking_uri=args.tracking_uri, dry_run=args.dry_run, workers=args.workers,
        report=not args.no_report, backend=args.backend, address=args.address, slurm=_slurm_options(args),
        detach=args.detach,
    )


def _slurm_options(args: argparse.Namespace) -> dict:
    """The ``--slurm-*`` options given (they override the study file's ``slurm:`` block)."""
    from harness.config import SLURM_OPTIONS

    out = {f: getattr(args, f"slurm_{f}") for f in SLURM_OPTIONS if getattr(args, f"slurm_{f}", None) is not None}
    if "extra" in out:
        extra = {}
        for item in out["extra"]:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise HarnessError(f"--slurm-extra: expected KEY=VALUE, got {item!r}")
            extra[key.strip()] = value.strip() or True
        out["extra"] = extra
    return out


def _cmd_status(args: argparse.Namespace) -> int:
    from harness.status import study_status

    return study_status(args.study, tracking_uri=args.tracking_uri, show_all=args.all)


def _cmd_methods(args: argparse.Namespace) -> int:
    from harness.methods.base import discover
    from harness.search import RECIPE_SPACES
    from harness.spaces import describe

    reg = discover()
    for name in reg.names():
        cls = reg.get(name)
        labels = " (sees labels)" if cls.uses_labels else ""
        print(f"{name}{labels}: {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}")
        if cls.terms:
            print("  loss terms: " + ", ".join(f"{t} (weight {w or '1'})" for t, w in cls.terms.items()))
        if cls.ablations:
            print("  ablations:  " + ", ".join(f"-{a} sets {w}=0" for a, w in cls.ablations.items()))
        fields = cls.ParamsModel.model_fields
        if fields:
            print("  parameters: " + ", ".join(f"{k}={f.default!r}" for k, f in fields.items()))
        if cls.trains:
            space = "; ".join(f"{k}: {describe(d)} (default {fields[k].default!r})" if k in fields else
                              f"{k}: {describe(d)} (not a parameter!)" for k, d in cls.search_space.items())
            print(f"  search space: {space + ' + ' if space else ''}the recipe space")
    print("recipe space (search.declared, per train.optimizer): " + "; ".join(
        f"{opt}: " + ", ".join(f"{k}: {describe(d)}" for k, d in space.items()) for opt, space in RECIPE_SPACES.items()))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from harness.tune import tune

    return tune(args.study, storage=args.storage, workers=args.workers, tracking_uri=args.tracking_uri,
                trials=args.trials, out=args.out, stale_after=float(args.stale_after), report=not args.no_report,
                backend=args.backend, slurm=_slurm_options(args))


def _cmd_benchmark(args: argparse.Namespace) -> int:
    if args.estimate and args.dry_run:
        raise HarnessError("--estimate and --dry-run: give one of them")
    if args.estimate and args.backend != "local":
        raise HarnessError(f"--estimate: estimates the local pool only; drop --backend {args.backend}")
    from harness.benchmark import benchmark

    return benchmark(args.suite, phases=args.phase, tracking_uri=args.tracking_uri, workers=args.workers,
                     backend=args.backend, address=args.address, slurm=_slurm_options(args), dry_run=args.dry_run,
                     estimate=args.estimate, out=args.out)


def _cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench import run_bench

    return run_bench(device=args.device, workers=args.workers, as_json=args.json, quick=args.quick)


def study_keys(text: str, source: str, precision: str | None = None) -> list[str]:
    """:func:`harness.grid.study_keys`, imported only when a study file is expanded (torch): the
    report of a study name never imports torch."""
    from harness.grid import study_keys as keys

    return keys(text, source, precision)


def _cmd_report(args: argparse.Namespace) -> int:
    """A study file given is expanded here and the report uses only runs of its trial keys; a
    study name uses the keys its latest study run logged (else its logged study file, expanded)."""
    from harness.report.build import build_report
    from harness.report.frames import recorded_keys, resolve_study

    _, text = resolve_study(args.study)  # a missing or broken study file: one line, exit 2
    keys = None
    if text is not None:  # the keys its run recorded (no torch), else the file expanded
        keys = (recorded_keys(args.study, args.tracking_uri) if args.precision is None else None) \
            or study_keys(text, args.study, args.precision)
    out = build_report(args.study, tracking_uri=args.tracking_uri, out_dir=args.out, keys=keys,
                       expand=lambda t: study_keys(t, "study.yaml logged by the latest study run", args.precision))
    from harness.report.reproduce import committed_line
    from harness.tracking import log_report

    print(f"report written to {out}{log_report(args.tracking_uri, resolve_study(args.study)[0], out)}")
    if (line := committed_line(out)) is not None:  # over a committed report: does it reproduce?
        print(line)
    return 0


PARQUET_ENGINES = ("pyarrow", "fastparquet")


def _parquet_engine() -> str:
    """The first Parquet engine pandas can use; one line naming what to install when there is none."""
    import importlib

    for name in PARQUET_ENGINES:
        try:
            importlib.import_module(name)
            return name
        except ImportError:
            continue
    raise HarnessError("export: --format parquet needs pyarrow or fastparquet: pip install pyarrow "
                       "(or use --format csv)")


def _cmd_export(args: argparse.Namespace) -> int:
    """``harness.results.trials`` (``--curves``: ``curves``) of a study, written to one CSV or
    Parquet file; the format is ``--format``, else the file's suffix (``.parquet``/``.pq``), else CSV."""
    from pathlib import Path

    fmt = args.format or ("parquet" if Path(args.out).suffix.lower() in (".parquet", ".pq") else "csv")
    engine = _parquet_engine() if fmt == "parquet" else None  # before the store is read
    from harness import results
    from harness.files import write_atomic

    read = results.curves if args.curves else results.trials
    try:
        df = read(args.study, tracking_uri=args.tracking_uri, scope=args.scope, precision=args.precision)
    except HarnessError as e:
        raise HarnessError(f"export: {e}") from None
    data = df.to_parquet(None, engine=engine, index=False) if engine else df.to_csv(index=False)
    write_atomic(args.out, data, what="export")
    name = df["study"].iloc[0] if len(df) else args.study
    what = "curve rows (run, metric, epoch)" if args.curves else "trials"
    print(f"{len(df)} {what} of study '{name}' (scope {args.scope}) written to {args.out} ({fmt})")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    """A study file given is scoped by its own trial keys (as in ``report``); a study name by the
    keys its latest study run logged. One line on stderr per split left out of the aggregates."""
    from harness.report.frames import recorded_keys
    from harness.report.leaderboard import build_leaderboard, resolve

    keys = {}
    for study in args.study:
        _, text = resolve(study)  # a missing or broken study file: one line, exit 2
        if text is not None:  # the keys its run recorded (no torch), else the file expanded
            keys[study] = recorded_keys(study, args.tracking_uri) or study_keys(text, study)
    board = build_leaderboard(args.study, tracking_uri=args.tracking_uri, out_dir=args.out, normalise=args.normalise,
                              reps=args.reps, keys=keys, power=args.power, cap=args.max_tasks,
                              expand=lambda t: study_keys(t, "study.yaml logged by the latest study run"))
    for line in board.left_out:
        print(f"harness: note: {line.replace('`', '')}", file=sys.stderr)
    for dup, kept in board.duplicates.items():
        print(f"harness: note: {dup} is {kept} under a second name (same content): counted once, as {kept}",
              file=sys.stderr)
    print(f"leaderboard written to {board.out}")
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    """Fetch, verify and extract a CIFAR archive into ``--root`` (nothing to do if present)."""
    from harness.data.download import download_dataset

    result = download_dataset(args.dataset, args.root, url=args.url)
    if result.already_present:
        print(f"{args.dataset}: already present in {result.folder}; nothing downloaded")
    else:
        print(f"{args.dataset}: ready in {result.folder}")
    return 0


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (checked before anything is created)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:<index>``."""
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _add_slurm_options(p: argparse.ArgumentParser) -> None:
    """The ``--slurm-*`` options (each overrides the study file's ``slurm:`` block)."""
    sl = p.add_argument_group("Slurm (--backend slurm; each overrides the study file's slurm: block)")
    sl.add_argument("--slurm-partition", metavar="NAME", help="partition (several joined by commas)")
    sl.add_argument("--slurm-gpus-per-task", type=int, metavar="N", help="GPUs per job (default 0)")
    sl.add_argument("--slurm-cpus-per-task", type=int, metavar="N", help="CPUs per job = torch threads (default 1)")
    sl.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="memory per job (default: the partition's)")
    sl.add_argument("--slurm-time-min", type=int, metavar="MIN", help="time limit per job in minutes (default 60)")
    sl.add_argument("--slurm-array-parallelism", type=int, metavar="N",
                    help="at most N trials of the array at once (default: --workers, else the study's "
                         "slurm.array_parallelism, else 64)")
    sl.add_argument("--slurm-setup", action="append", metavar="LINE",
                    help="a shell line the batch script runs first (module load ..., source .../activate); repeat")
    sl.add_argument("--slurm-extra", action="append", metavar="KEY=VALUE",
                    help="any other sbatch option, e.g. account=lab, qos=high, exclusive= (a flag); repeat")
    sl.add_argument("--slurm-folder", metavar="DIR",
                    help="job scripts, pickles and logs, on a file system every node sees "
                         "(default .harness_slurm/<study>)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Knowledge-amalgamation study harness.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run-study", help="train teachers, run every method/ablation/seed, log to MLflow")
    r.add_argument("study", help="study YAML file")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's default)")
    r.add_argument("--dry-run", action="store_true", help="print the trial table and run nothing")
    r.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="run at most N trials at a time (default: one per slot of the device pool)")
    r.add_argument("--backend", choices=("local", "ray", "slurm"), default="local",
                   help="local: worker processes on this machine's devices; ray: Ray tasks on a Ray cluster; "
                        "slurm: Slurm jobs (a job array of trials; see docs/slurm.md)")
    r.add_argument("--address", default=None,
                   help="Ray cluster address (with --backend ray; default: start Ray on this machine), "
                        "e.g. auto or ray://head:10001")
    r.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    r.add_argument("--detach", action="store_true",
                   help="with --backend slurm: submit every trial, print the job ids and exit; follow with "
                        "'harness status', rerun to resubmit what failed")
    _add_slurm_options(r)
    r.add_argument("--estimate", action="store_true",
                   help="run nothing: calibrate each distinct combination briefly on this machine and print the "
                        "teacher and trial hours per split, device-hours and the estimated wall time")
    r.set_defaults(func=_cmd_run_study)

    t = sub.add_parser("tune", help="Optuna search of loss weights, temperatures and recipe on the validation split")
    t.add_argument("study", help="study YAML file with a search: block")
    t.add_argument("--storage", default=None,
                   help="Optuna storage: a journal file path (default results/<study>/tune.journal) or an RDB URL "
                        "(sqlite:///tune.db, postgresql://user@host/db) shared by several machines")
    t.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="run at most N trials at a time on the device pool (default: one per slot); with "
                        "--backend slurm: N Slurm jobs, one trial at a time each (default 1)")
    t.add_argument("--trials", type=_positive_int, default=None, metavar="N",
                   help="trials per tuned method (default: search.trials); raise it to extend a finished search")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's default)")
    t.add_argument("--out", default=None, help="tuned study file (default: <study dir>/<name>.tuned.yaml)")
    t.add_argument("--stale-after", type=_positive_int, default=300, metavar="SECONDS",
                   help="a RUNNING trial of another host with no heartbeat for this long is failed and rerun")
    t.add_argument("--no-report", action="store_true", help="do not rebuild the report at the end")
    t.add_argument("--backend", choices=("local", "slurm"), default="local",
                   help="local: worker processes on this machine; slurm: --workers N Slurm jobs, each running "
                        "the search loop on the shared --storage (see docs/slurm.md)")
    _add_slurm_options(t)
    t.set_defaults(func=_cmd_tune)

    bm = sub.add_parser("benchmark", help="tune every method with the same budget on validation, evaluate the best "
                        "and the defaults on fresh seeds, report verdicts (a suite of tasks)")
    bm.add_argument("suite", help="suite YAML file (see docs/benchmark.md)")
    bm.add_argument("--phase", action="append", choices=("tune", "evaluate", "defaults", "report"), default=None,
                    help="run only this phase (repeatable; default: every phase in order)")
    bm.add_argument("--dry-run", action="store_true", help="list the tasks, phases and trial counts; run nothing")
    bm.add_argument("--estimate", action="store_true", help="calibrate and print the cost of each phase per task")
    bm.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                    help="run at most N trials at a time on the device pool (default: one per slot)")
    bm.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's default)")
    bm.add_argument("--out", default=None, help="the suite's folder (default results/<suite>/): its phase study "
                    "files, Optuna journal and report")
    bm.add_argument("--backend", choices=("local", "ray", "slurm"), default="local",
                    help="where trials run (the tune phase: local or slurm)")
    bm.add_argument("--address", default=None, help="Ray cluster address (--backend ray)")
    _add_slurm_options(bm)
    bm.set_defaults(func=_cmd_benchmark)

    st = sub.add_parser("status", help="what is finished, running, pending or failed (MLflow and Slurm's sacct)")
    st.add_argument("study", help="study file or study name")
    st.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's default)")
    st.add_argument("--all", action="store_true", help="list the finished trials too")
    st.set_defaults(func=_cmd_status)

    rep = sub.add_parser("report", help="tables, statistics and plots from MLflow into results/<study>/")
    rep.add_argument("study", help="study name (runs of the keys its latest study run logged) or study file "
                                   "(runs of that file's trial keys only)")
    rep.add_argument("--tracking-uri")
    rep.add_argument("--out", default=None, help="output folder (default results/<study>)")
    rep.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                     help="with a study file: the precision its trials ran at (default: the one this machine's "
                          "devices give; a study run on GPUs with train.amp ran at bf16)")
    rep.set_defaults(func=_cmd_report)

    ex = sub.add_parser("export", help="a study's trials (one row per finished trial run: metrics and params) or, "
                                       "with --curves, its per-epoch metrics, to CSV or Parquet for notebooks")
    ex.add_argument("study", help="study name or study file, as for report (the same runs as its tables)")
    ex.add_argument("--out", required=True, metavar="FILE", help="file to write (replaced if it exists)")
    ex.add_argument("--format", choices=("csv", "parquet"), default=None,
                    help="default: parquet for a .parquet/.pq FILE, else csv (parquet needs pyarrow or fastparquet)")
    ex.add_argument("--curves", action="store_true",
                    help="per-epoch metrics, long form (one row per run, metric and epoch) instead of the trials")
    ex.add_argument("--scope", choices=("study", "all"), default="study",
                    help="study: the runs of the report's tables (default); all: every finished trial run of the "
                         "experiment, e.g. of earlier versions of the study file (column in_report)")
    ex.add_argument("--tracking-uri")
    ex.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="with a study file: the precision its trials ran at (as for report)")
    ex.set_defaults(func=_cmd_export)

    lb = sub.add_parser("leaderboard", help="one table over several studies: normalised scores per split, IQM and "
                                            "mean with stratified bootstrap CIs, ranks, P(cka > other), profiles")
    lb.add_argument("study", nargs="+", help="study names or study files (task = study/split)")
    lb.add_argument("--tracking-uri")
    lb.add_argument("--out", default=None, help="output folder (default results/leaderboard)")
    lb.add_argument("--normalise", choices=("scratch", "teachers", "none"), default="scratch",
                    help="divide each split's scores by the scratch student's mean (default), the teachers' oracle "
                         "ensemble (else their claiming ensemble), or nothing")
    lb.add_argument("--reps", type=_positive_int, default=2000, metavar="N", help="bootstrap replicates (default 2000)")
    lb.add_argument("--power", type=_probability, default=0.8,
                    help="for an inconclusive pair: the share of resampled leaderboards that must resolve it "
                         "(default 0.8)")
    lb.add_argument("--max-tasks", type=_positive_int, default=1000, metavar="N",
                    help="the largest task count the tasks-needed estimate tries (default 1000)")
    lb.set_defaults(func=_cmd_leaderboard)

    b = sub.add_parser("bench", help="overhead, cache and makespan ratios measured in one run")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:N (default: cpu; cuda adds the GPU figures)")
    b.add_argument("--workers", type=_positive_int, default=2, help="slots for the makespan study")
    b.add_argument("--quick", action="store_true", help="one repetition each (a smoke test, not a measurement)")
    b.set_defaults(func=_cmd_bench)

    m = sub.add_parser("methods", help="list registered methods, their loss terms and parameters")
    m.set_defaults(func=_cmd_methods)

    d = sub.add_parser("data", help="data set utilities")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    dl = dsub.add_parser("download", help="fetch, verify (MD5) and extract CIFAR-10/100 into --root; "
                                          "an interrupted download resumes")
    dl.add_argument("dataset", choices=("cifar10", "cifar100"))
    dl.add_argument("--root", required=True, help="existing folder to download into; afterwards "
                                                  "dataset: {name: DATASET, root: ROOT} reads it")
    dl.add_argument("--url", default=None,
                    help="mirror: the archive's URL, or a base URL the archive's file name is appended to "
                         "(default: $HARNESS_CIFAR_URL, else https://www.cs.toronto.edu/~kriz/)")
    dl.set_defaults(func=_cmd_data_download)
    return p


def _storage_fault(e: BaseException, tracking_uri: str | None) -> HarnessError | None:
    """The one line for a full, read-only or unwritable file system (:func:`harness.files.storage_fault`):
    SQLite's words name the tracking store's file, an ``OSError`` its own path."""
    from harness.files import fault_errno, storage_fault

    found = fault_errno(e)
    if found is None:
        return None
    if found[1] is None:  # no path of its own: the tracking store said it
        from harness.tracking import resolve_uri, store_path

        uri = resolve_uri(tracking_uri)
        return storage_fault(e, "tracking store", store_path(uri) or uri)
    return storage_fault(e)


def main(argv: list[str] | None = None) -> int:
    from harness.console import quiet

    quiet()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a file system that refuses (full, read-only): one line too
        fault = _storage_fault(e, getattr(args, "tracking_uri", None))
        if fault is None:
            raise
        print(f"harness: error: {fault}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
