"""Fault injection: what a long run meets on real clusters, reproduced on the micro config.

- SIGTERM to the whole process group (as SLURM and preempted VMs send it), with Grain
  worker processes: exit 0, a checkpoint, a resume from it, no process left behind.
- SIGTERM during start-up: one process (our handler, installed before the slow work) and
  two processes (JAX's preemption service, which owns SIGTERM after initialize()).
- A corrupt newest checkpoint (a truncated data file): moved aside, the run resumes from
  the previous step and ends bit-identical to a run that never saw the damage; killed
  saves' temporary folders are cleaned; when every step fails nothing is moved.
The launch scripts' faults are in test_launch.py; NaN and SIGKILL in test_train.py.
"""

import glob
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from launch_fakes import run_tpu_vm
from train_helpers import (
    CONFIG,
    ROOT,
    assert_trees_equal,
    copy_run,
    env,
    read,
    start,
    state,
    steps_on_disk,
    summary,
    train,
    wait_for,
)


def _group_gone(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _stopped_step(err):
    found = re.search(r"SIGTERM: checkpoint at step (\d+) saved", err)
    assert found, err[-3000:]
    return int(found.group(1))


def test_group_sigterm_with_worker_processes_saves_and_resumes(tmp_path, tiny_run):
    """2 Grain worker processes, batch 32 against 2 x 4 buffered elements: the batch after
    the signal must come from the workers. Were they killed by the signal, that read would
    fail before the checkpoint ("Worker process was terminated unexpectedly")."""
    w = copy_run(tiny_run, tmp_path / "workers", data_only=True)
    log = str(tmp_path / "workers.log")
    args = ["--config.data.num_workers=2", "--config.train.batch_size=32", "--config.data.prefetch_to_device=0",
            "--config.train.log_every=1", "--config.train.checkpoint_every=1000"]
    with start(w, "--config.train.steps=100000", *args, log=log) as p:
        wait_for(lambda: "steps_per_sec" in read(log) or p.poll() is not None, what="training steps")
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(timeout=300) == 0, read(log)[-3000:]
    step = _stopped_step(read(log))
    assert "data pipeline failed" not in read(log)  # the workers lived on; the next batch came
    assert "leaked shared_memory" not in read(log)  # and the trainer closed the pipeline before exiting
    assert str(step) in steps_on_disk(w)
    wait_for(lambda: _group_gone(p.pid), timeout=30, what="the worker processes to end with the trainer")

    # the rerun resumes from it; then SIGKILL (nothing can be caught) to the trainer alone:
    # its workers, which ignore SIGTERM, notice they were orphaned and end on their own
    log2 = str(tmp_path / "resumed.log")
    with start(w, "--config.train.steps=100000", *args, log=log2) as p:
        wait_for(lambda: "steps_per_sec" in read(log2) or p.poll() is not None, what="resumed steps")
        assert f"resumed from step {step}" in read(log2)
        workers = _grain_workers(p.pid)
        assert len(workers) == 2, workers
        p.kill()
        p.wait()
        wait_for(lambda: not _alive(workers), timeout=30, what="orphaned workers to exit")


def _alive(pids):
    """Those of `pids` that are still a Grain worker (a pid could be reused by another process)."""
    out = []
    for pid in pids:
        try:
            if "spawn_main" in read(f"/proc/{pid}/cmdline"):
                out.append(pid)
        except OSError:
            pass
    return out


def _grain_workers(pid):
    """The worker processes `pid` spawned (not multiprocessing's resource tracker)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = int(read(stat).rsplit(")", 1)[1].split()[1])
            cmdline = read(stat[:-4] + "cmdline")
        except (OSError, ValueError):
            continue
        if ppid == pid and "spawn_main" in cmdline:
            out.append(int(stat.split("/")[2]))
    return out


def test_a_dead_worker_process_ends_the_run_with_its_last_step_saved(tmp_path, tiny_run):
    """No signal, a Grain worker killed (the OOM killer): the read fails; the step already
    computed is saved with the data state of the batches it consumed, then exit 1."""
    w = copy_run(tiny_run, tmp_path / "dead_worker", data_only=True)
    log = str(tmp_path / "dead_worker.log")
    args = ["--config.data.num_workers=2", "--config.train.batch_size=32", "--config.data.prefetch_to_device=0",
            "--config.train.log_every=1", "--config.train.checkpoint_every=1000"]
    with start(w, "--config.train.steps=100000", *args, log=log) as p:
        wait_for(lambda: "steps_per_sec" in read(log) or p.poll() is not None, what="training steps")
        workers = _grain_workers(p.pid)
        assert len(workers) >= 2, workers
        os.kill(workers[0], signal.SIGKILL)
        assert p.wait(timeout=300) == 1, read(log)[-3000:]
    err = read(log)
    assert "error: data pipeline failed (Worker process was terminated unexpectedly" in err
    step = int(re.search(r"checkpoint at step (\d+) saved", err).group(1))
    assert steps_on_disk(w) == [str(step)] and state(w)[0] == step


def test_sigterm_during_start_up_exits_zero_and_keeps_the_checkpoints(tmp_path, tiny_run):
    """SIGTERM after the handler is up and before the first step: exit 0, nothing saved,
    the checkpoints as they were. The signal is sent when the log says start-up has begun;
    on a machine loaded enough that it lands after start-up instead, that outcome is checked
    too (the step it stopped at saved, exit 0) and the start-up case is tried again."""
    for attempt in range(3):
        w = copy_run(tiny_run, tmp_path / f"early{attempt}")
        _, before = state(w, 4)
        log = str(tmp_path / f"early{attempt}.log")
        with start(w, "--config.train.steps=100", log=log) as p:
            # after the process has started its work (config validated, devices up), before the loop
            wait_for(lambda: "process 0/1" in read(log) or p.poll() is not None, what="start-up")
            os.killpg(p.pid, signal.SIGTERM)
            assert p.wait(timeout=300) == 0, read(log)[-3000:]
        if "SIGTERM: checkpoint at step" in read(log):  # the signal came after start-up
            stopped = _stopped_step(read(log))
            assert steps_on_disk(w) == ["2", "4", str(stopped)]
            continue
        assert "SIGTERM: no step taken since start-up; latest checkpoint: 4" in read(log)
        assert steps_on_disk(w) == ["2", "4"]
        assert_trees_equal(before, state(w, 4)[1])
        return
    pytest.fail("three SIGTERMs in a row landed after start-up had finished: the start-up case was never seen")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_during_start_up_of_two_processes(tmp_path, tiny_run):
    """Both processes get SIGTERM while starting (after jax.distributed.initialize()): JAX's
    preemption service, not a handler of ours, has the signal then; the processes agree on
    the first step as the stop step, both save their part of it and exit 0."""
    w = copy_run(tiny_run, tmp_path / "two", data_only=True)
    port = _free_port()
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    procs = []
    for i in range(2):
        extra = [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "smartbrush_jax.train", f"--config={CONFIG}", f"--workdir={w}",
             "--config.train.steps=100", *extra], env=env(1), cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=open(logs[i], "w"), process_group=procs[0].pid if procs else 0))  # one group: the job
    try:
        wait_for(lambda: all(f"process {i}/2" in read(logs[i]) for i in range(2))
                 or any(p.poll() is not None for p in procs), what="both processes to initialize")
        os.killpg(procs[0].pid, signal.SIGTERM)  # the job's process group, as a scheduler signals it
        rcs = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i in range(2):
        assert rcs[i] == 0, read(logs[i])[-3000:]
        assert "SIGTERM is handled by JAX's preemption service" in read(logs[i])
        assert _stopped_step(read(logs[i])) == 1
    assert steps_on_disk(w) == ["1"]
    assert state(w)[0] == 1


def _truncate_largest(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
    return big


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes(tmp_path, tiny_run):
    reference = copy_run(tiny_run, tmp_path / "reference")
    proc = train(reference, "--config.train.steps=6")
    assert proc.returncode == 0 and "resumed from step 4" in proc.stderr, proc.stderr[-3000:]

    w = copy_run(tiny_run, tmp_path / "damaged")
    _truncate_largest(os.path.join(w, "checkpoints", "4"))  # a host died while writing step 4
    os.makedirs(os.path.join(w, "checkpoints", "5.orbax-checkpoint-tmp-1764547200", "state"))  # a killed save
    proc = train(w, "--config.train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 4 cannot be restored" in proc.stderr and "moved to" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    assert steps_on_disk(w) == ["2", "4", "4.corrupt", "6"]  # step 4 saved anew; the killed save's folder gone
    # steps 3-6 were recomputed from step 2 with the data iterator of step 2: bit-identical
    assert_trees_equal(state(reference, 6)[1], state(w, 6)[1])
    assert summary(w)["steps"] == 6


def test_when_every_checkpoint_fails_nothing_is_moved(tmp_path, tiny_run):
    w = copy_run(tiny_run, tmp_path / "all_bad")
    for step in ("2", "4"):
        _truncate_largest(os.path.join(w, "checkpoints", step))
    proc = train(w, "--config.train.steps=6")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no checkpoint could be restored (nothing was moved or deleted)" in proc.stderr
    assert "step 4:" in proc.stderr and "step 2:" in proc.stderr
    assert steps_on_disk(w) == ["2", "4"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's abandoned reads
def test_readers_skip_a_damaged_newest_step(tmp_path, tiny_run, capsys):
    """Inpainting and export read the newest step that restores and say so; they never
    move or change anything in the run."""
    from smartbrush_jax.checkpoints import restore_params

    w = copy_run(tiny_run, tmp_path / "read")
    _truncate_largest(os.path.join(w, "checkpoints", "4"))
    step, params = restore_params(w)
    assert step == 2 and params
    assert "using step 2; newer steps cannot be restored (step 4:" in capsys.readouterr().err
    assert steps_on_disk(w) == ["2", "4"]


# ---------------------------------------------------------------------- launch scripts

def test_tpu_vm_delete_never_removes_a_vm_it_did_not_create(tmp_path):
    p, calls, _ = run_tpu_vm(tmp_path, "ACTIVE", "install_fails", "--delete")
    assert p.returncode != 0 and "pip: no network" in p.stderr
    assert "existed before this run, so it is kept" in p.stderr
    assert " delete " not in f" {calls}"


def test_tpu_vm_delete_removes_the_vm_it_created_also_on_failure(tmp_path):
    p, calls, _ = run_tpu_vm(tmp_path, "", "install_fails", "--delete")
    assert p.returncode != 0
    assert "compute tpus queued-resources create sb" in calls and "compute tpus queued-resources delete sb" in calls


def test_tpu_vm_refuses_to_start_over_a_running_trainer(tmp_path):
    _, _, fake = run_tpu_vm(tmp_path, "ACTIVE", "ok", "--detach")  # a first, detached launch
    home = fake / "worker1" / "smartbrush"
    assert (fake / "worker1" / "trainer_calls").read_text().startswith("trainer -m smartbrush_jax.train")
    (home / "train.log").write_text("step 1000: the first run's log\n")
    # the first run's trainer, still alive on worker 1
    alive = subprocess.Popen(["bash", "-c", "exec -a 'python -m smartbrush_jax.train --distributed' sleep 60"],
                             cwd=str(home))
    try:
        p, calls, _ = run_tpu_vm(tmp_path, "ACTIVE", "ok", "--detach")
    finally:
        alive.kill()
        alive.wait()
    assert p.returncode == 1, p.stderr
    assert "a trainer is already running on sb" in p.stderr and f"pid {alive.pid}" in p.stderr
    assert (home / "train.log").read_text() == "step 1000: the first run's log\n"  # nothing replaced
    assert len((fake / "worker1" / "trainer_calls").read_text().splitlines()) == 1  # no second trainer

    p, _, _ = run_tpu_vm(tmp_path, "ACTIVE", "ok", "--detach")  # once it has stopped: starts, keeps the log
    assert p.returncode == 0, p.stderr
    assert (home / "train.log").read_text().startswith("step 1000: the first run's log\n")
    assert len((fake / "worker1" / "trainer_calls").read_text().splitlines()) == 2


def _two_steps(root):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from smartbrush_jax import checkpoints

    tree = {"w": jnp.arange(50000.0), "b": jnp.ones((8, 8))}
    mngr = checkpoints.manager(str(root), keep_last=5, keep_every=0, async_save=False)
    for step in (1, 2):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({k: v + step for k, v in tree.items()})))
    mngr.wait_until_finished()
    return mngr, {k: jax_struct(v) for k, v in tree.items()}


def jax_struct(a):
    import jax

    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def test_a_restore_error_that_is_not_damage_moves_nothing(tmp_path, monkeypatch):
    """Row: any restore error of the newest step, whatever its cause (a bug, a network or
    credentials error, a version change), moved it aside and tried an older one, so a
    transient error could demote every step in turn. Now only a step shown damaged (a
    truncated file) is moved; any other error stops with that error, nothing moved."""
    from smartbrush_jax import checkpoints

    mngr, abstract = _two_steps(tmp_path / "run")
    real = checkpoints.restore

    def flaky(m, step, *a, **k):
        if step == 2:
            raise ValueError("Relative import statements not supported (core).")  # what the gs:// run met
        return real(m, step, *a, **k)

    monkeypatch.setattr(checkpoints, "restore", flaky)
    with pytest.raises(checkpoints.CheckpointFailure, match="not because its files are damaged.*nothing was moved"):
        checkpoints.restore_newest_intact(mngr, abstract)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
    monkeypatch.setattr(checkpoints, "restore", real)

    # the same step with a truncated data file is damage: moved aside, step 1 restored
    _truncate_largest(str(tmp_path / "run" / "checkpoints" / "2"))
    step, state = checkpoints.restore_newest_intact(mngr, abstract)
    assert step == 1 and float(state["b"][0, 0]) == 2.0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2.corrupt"]


@pytest.mark.parametrize("how", ["truncate", "delete", "garble manifest", "garble metadata json",
                                 "flip bytes in metadata"])
def test_damage_is_told_from_other_restore_errors(tmp_path, how):
    """What a damaged step raises, from each kind of damage, is classified as damage; a
    shape that does not fit and an import error are not."""
    import glob as glob_

    import jax

    from smartbrush_jax import checkpoints

    mngr, abstract = _two_steps(tmp_path / "run")
    step_dir = str(tmp_path / "run" / "checkpoints" / "2")
    files = sorted((f for f in glob_.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
                    if os.path.isfile(f)), key=os.path.getsize)
    if how == "truncate":
        _truncate_largest(step_dir)
    elif how == "delete":
        os.remove(files[-1])
    elif how == "garble manifest":
        open(os.path.join(step_dir, "state", "manifest.ocdbt"), "r+b").truncate(10)
    elif how == "garble metadata json":
        open(os.path.join(step_dir, "state", "_METADATA"), "w").write("{not json")
    else:  # bytes that are not UTF-8 in the middle of a JSON file, its size unchanged (a UnicodeDecodeError)
        with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            f.write(b"\xa4\xff\xfe\xa4")
    with pytest.raises(Exception) as e:
        checkpoints.restore(mngr, 2, abstract)
    assert checkpoints.damage(e.value) is not None, repr(e.value)

    with pytest.raises(Exception) as e:
        checkpoints.restore(mngr, 1, {"w": jax.ShapeDtypeStruct((5,), abstract["w"].dtype), "b": abstract["b"]})
    assert checkpoints.damage(e.value) is None
    assert checkpoints.damage(ValueError("Relative import statements not supported (core).")) is None
    assert checkpoints.damage(ValueError('UNAVAILABLE: Error reading "w/0": connection reset')) is None


def test_abandoned_reads_of_a_damaged_step_are_not_printed_as_tracebacks(monkeypatch):
    """Row: during a correct recovery from a truncated chunk, Orbax's abandoned reads of the
    step's other arrays printed "Exception ignored in coroutine ... Traceback" blocks (the
    damage was already said once). Those are dropped; any other unraisable still reaches
    the hook that was there."""
    import types

    from smartbrush_jax import checkpoints

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    checkpoints._quiet_aborted_writes()
    damaged = ValueError('OUT_OF_RANGE: Error reading "w/0" in OCDBT database at local file "/r/checkpoints/4/state/": '
                         "Requested byte range [0, 10) is not valid for value of size 5")
    for exc in (damaged, RuntimeError("a bug of ours")):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                                 err_msg="Exception ignored in", object="<coroutine _read_array>"))
    assert seen == ["a bug of ours"]
