"""`python -m smartbrush_jax.train --config=configs/tpu_v4.py --workdir=DIR` (or `smartbrush-train`)

Trains SmartBrush (`smartbrush_jax.train.loop.run`). Any config field can be overridden:
`--config.optim.lr=2e-5`. Several processes: `--distributed` (the cluster's auto-detection:
Cloud TPU, SLURM, ...) or `--coordinator_address=host:port --num_processes=N --process_id=i`.
Exit codes: 0 done or stopped by SIGTERM with a checkpoint, 1 the run cannot go on (too
many non-finite steps, the data pipeline failed), 2 bad input (config, data, checkpoints).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer imports TensorFlow

import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smartbrush_jax.cli.absl_config import check_config_file, parse_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with the cluster's auto-detection")


def main(argv) -> None:
    del argv
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    from smartbrush_jax.config import validate
    from smartbrush_jax.errors import Failure, InputError
    from smartbrush_jax.train.workdir_lock import check_workdir

    try:  # what can be told from the config and the workdir alone, before JAX starts (the run checks again)
        validate(FLAGS.config)
        check_workdir(FLAGS.workdir)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from smartbrush_jax import libtpu_flags as tpu_flags

    tpu_flags.apply(FLAGS.config.train.libtpu_flags)  # read by libtpu when it loads: before JAX starts
    from smartbrush_jax.checkpoints import DiskFull
    from smartbrush_jax.train.loop import Distributed, TrainingError, run

    distributed = Distributed(auto=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
                              num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    try:
        run(FLAGS.config, FLAGS.workdir, distributed=distributed)
    except (TrainingError, Failure, InputError) as e:  # bad input: 2; a run that cannot go on: 1; bugs: traceback
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        code = 2 if isinstance(e, InputError) else 1
        if isinstance(e, DiskFull):
            # the run has closed everything of its own; what is left are the aborted save's
            # writes in TensorStore's threads, whose callbacks print "Event loop is closed"
            # tracebacks if the interpreter shuts down under them (seen under load): leave now
            logging.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)


def console():
    """Entry point of the `smartbrush-train` console script and of `python -m`."""
    check_config_file(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
