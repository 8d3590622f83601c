"""A grid of train_cifar.py runs on Dask (this machine, a Dask scheduler, or a batch queue),
each resumed after any loss, and one table of their results (docs/sweeps.md).

    python scripts/sweep.py SWEEP.toml|SWEEP.json --out DIR
    python scripts/sweep.py --out DIR --axis sparsity 0 0.5 --axis seed 0 1 \\
        --flag preset twofold --flag init BASELINE.h5 --flag data cifar10 [--eval images 1000]

A sweep file has three tables: [axes] (flag = [values]; the runs are their product), [flags]
(train_cifar.py flags every run gets) and [cim_eval] (cim_eval.py flags of the collection);
--axis, --flag and --eval add to or replace its entries. Flags are train_cifar.py's, without
the dashes (`lambda-net = 0.001`, `nesterov = false`, `milestones = [91, 136]`). Runs that
differ in several flags are an axis of variants, tables with a name: `bitreg = [{name = "off",
beta-bit = 0}, {name = "on", beta-bit = 20, plane-drop-tolerance = 0.02}]`, on the command
line `--axis bitreg '{"name": "off", "beta-bit": 0}' '{"name": "on", ...}'`. Each run is
`train_cifar.py FLAGS --resume --out DIR/<axis>-<value>_...` in its own folder, so a stopped
or lost run continues from its last epoch and finished runs are skipped. cim_eval.py runs on
each run once it is trained, and DIR/results.md (.csv, .json) and, with matplotlib, plots are
rewritten with every run collected; --collect-only redoes just that. The exit status is 1 if a run failed after
its retries.

Where the runs go: by default a local Dask cluster with one worker per --run-threads cores of
this machine; --scheduler ADDRESS uses running Dask workers (on a shared filesystem);
--cluster slurm|pbs|sge|lsf submits worker jobs through dask-jobqueue. Dask is the optional
extra 'cluster': pip install -e '.[cluster]'.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)
from nptwofold.options import ScriptParser  # noqa: E402
from nptwofold.sweep import CLUSTERS  # noqa: E402


def parse_args(argv):
    parser = ScriptParser(__doc__)
    parser.add_argument("sweep_file", nargs="?", help="sweep file, .toml (Python >= 3.11) or "
                        ".json (default: the --axis flags, or with --collect-only the sweep "
                        "recorded in --out)")
    parser.add_argument("--out", required=True, help="folder of the sweep: its runs, manifest "
                        "and tables (on a filesystem every worker sees)")
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--axis", nargs="+", action="append", default=[],
                      metavar=("FLAG", "VALUE"), help="an axis: a train_cifar.py flag and its "
                      "values, or a name and JSON variants; repeatable")
    grid.add_argument("--flag", nargs="+", action="append", default=[], metavar=("FLAG", "VALUE"),
                      help="a train_cifar.py flag every run gets (no value: a switch); "
                      "repeatable")
    grid.add_argument("--eval", nargs="+", action="append", default=[], metavar=("FLAG", "VALUE"),
                      help="a cim_eval.py flag of the collection (e.g. --eval images 1000); "
                      "repeatable")
    running = parser.add_argument_group("running")
    running.add_argument("--collect-only", action="store_true",
                         help="train nothing: evaluate the finished runs and write the tables")
    running.add_argument("--run-threads", type=int, default=1,
                         help="engine threads of each run (one run per this many cores)")
    running.add_argument("--workers", type=int, help="local cluster: worker processes (default: "
                         "cores / --run-threads); --cluster: most worker jobs at once (default: "
                         "one per run)")
    running.add_argument("--retries", type=int, default=2,
                         help="times a run that failed is started again")
    running.add_argument("--lost-workers", type=int, default=10,
                         help="local cluster and --cluster: times a run may lose its worker "
                         "(a killed or timed-out job) before it counts as failed")
    running.add_argument("--progress-every", type=float, default=60,
                         help="seconds between progress lines when nothing changes")
    running.add_argument("--dashboard", default=":8787",
                         help="address of the Dask dashboard (not with --scheduler: "
                         "the scheduler's own)")
    where = parser.add_argument_group("a Dask scheduler or a batch queue")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="a running Dask scheduler (tcp://host:8786) whose workers run the "
                       "runs (default: a local cluster)")
    where.add_argument("--cluster", choices=CLUSTERS,
                       help="start workers as batch jobs through dask-jobqueue (default: none)")
    where.add_argument("--queue", help="--cluster: queue or partition (default: jobqueue config)")
    where.add_argument("--account", help="--cluster: account (project on SGE and LSF) (default: "
                       "jobqueue config)")
    where.add_argument("--walltime", help="--cluster: time limit of a worker job, e.g. "
                       "04:00:00; a run outlasting it resumes in the next job (default: "
                       "jobqueue config)")
    where.add_argument("--job-memory", help="--cluster: memory of a job, e.g. 4GB (default: "
                       "jobqueue config, else 4GB)")
    where.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                       help="--cluster: extra scheduler directive, e.g. '--constraint=cpu'; "
                       "repeatable")
    where.add_argument("--job-prologue", action="append", default=[], metavar="LINE",
                       help="--cluster: shell line run before the worker, e.g. 'source "
                       ".venv/bin/activate'; repeatable")
    args = parser.parse_args(argv)
    for name in ("run_threads", "workers", "lost_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if args.retries < 0 or not args.progress_every > 0:
        parser.error("--retries must be >= 0 and --progress-every > 0")
    if args.scheduler and args.cluster:
        parser.error("give --scheduler or --cluster, not both")
    if not args.cluster and (args.queue or args.account or args.walltime or args.job_memory
                             or args.job_extra or args.job_prologue):
        parser.error("--queue, --account, --walltime, --job-memory, --job-extra and "
                     "--job-prologue belong to --cluster")
    for given in args.axis:
        if len(given) < 2:
            parser.error(f"--axis {given[0]} needs at least one value")
    return args


def the_sweep(args):
    """The Sweep of the file and the --axis/--flag/--eval flags; None if neither is given."""
    from nptwofold.sweep import Sweep, load_sweep_file, parse_value

    def value_of(texts):
        return True if not texts else parse_value(texts[0]) if len(texts) == 1 else [
            parse_value(text) for text in texts]

    if not (args.sweep_file or args.axis or args.flag or args.eval):
        return None
    sweep = load_sweep_file(args.sweep_file) if args.sweep_file else None
    axes = dict(sweep.axes) if sweep else {}
    flags = dict(sweep.flags) if sweep else {}
    cim_eval = dict(sweep.cim_eval) if sweep else {}
    for table, given in ((axes, args.axis), (flags, args.flag), (cim_eval, args.eval)):
        for name, *texts in given:
            table[name.replace("-", "_")] = ([parse_value(text) for text in texts]
                                             if table is axes else value_of(texts))
    return Sweep(axes, flags, cim_eval, dict(sweep.chip) if sweep else {})


def client_opener(args, opened):
    """open_client(number of runs) for run_sweep: a Dask client for the way the runs should
    go; what it opens is appended to `opened`, for closing."""
    from nptwofold import sweep as runner

    def open_client(n_runs):
        if args.scheduler:
            opened.append(runner.connect(args.scheduler))
            return opened[-1]
        if args.cluster:
            cluster = runner.jobqueue_cluster(
                args.cluster, run_threads=args.run_threads, queue=args.queue,
                account=args.account, walltime=args.walltime, memory=args.job_memory,
                job_extra=args.job_extra, prologue=args.job_prologue,
                lost_workers=args.lost_workers, dashboard_address=args.dashboard)
            opened.append(cluster)
            cluster.adapt(minimum=0, maximum=args.workers or n_runs)
        else:
            opened.append(runner.local_cluster(args.workers, args.run_threads, args.dashboard,
                                               args.lost_workers))
        opened.append(runner.connect(opened[-1]))
        return opened[-1]
    return open_client


def main(argv=None):
    configure_threads(1)
    args = parse_args(argv)
    from nptwofold.errors import NptwofoldError
    from nptwofold.sweep import run_sweep

    opened = []
    try:
        sweep = the_sweep(args)
        if sweep is None and not args.collect_only:
            raise NptwofoldError("give a sweep file or --axis flags (or --collect-only to "
                                 "redo the tables of --out)")
        _, failures = run_sweep(sweep, args.out, client_opener(args, opened),
                                collect_only=args.collect_only, retries=args.retries,
                                run_threads=args.run_threads, progress_every=args.progress_every,
                                print_line=lambda line: print(line, flush=True))
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        print("interrupted: the runs in progress saved their position; the same command "
              "continues the sweep", file=sys.stderr)
        sys.exit(130)
    finally:
        for resource in reversed(opened):  # the client before its cluster
            resource.close()
    if failures:
        sys.exit(f"error: {len(failures)} run(s) failed: {', '.join(failures)}")


if __name__ == "__main__":
    from nptwofold.errors import run_script
    run_script(main)
