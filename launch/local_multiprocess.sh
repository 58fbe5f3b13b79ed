#!/usr/bin/env bash
# N trainer processes on this machine, each with D simulated CPU devices, joined by
# jax.distributed (gloo collectives on CPU): the multi-host code path without a cluster.
# This is the launcher CI runs (tests/test_launch.py).
#
#   launch/local_multiprocess.sh -n 2 -d 4 -- --config=configs/cpu_demo.py --workdir=runs/mp
#
# Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D
# and --coordinator_address=localhost:PORT --num_processes=N --process_id=i. Its output
# lines are prefixed with [pi]; process 0 goes to stdout, the others to stderr.
# If a process fails, the others are killed and this script exits with that first
# non-zero code. INT/TERM are forwarded as SIGTERM (each trainer saves a checkpoint at the
# same step and exits 0; the script then exits 0); a second INT/TERM kills them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT]
                                    [--python PYTHON] -- TRAINER_ARGS...

  -n, --num-processes N        processes to start (env NUM_PROCESSES, default 2)
  -d, --devices-per-process D  simulated CPU devices per process (env DEVICES_PER_PROCESS, default 4)
  -p, --port PORT              coordinator port on localhost (env PORT, default: a free port)
  --python PYTHON              interpreter (env PYTHON, default .venv/bin/python, else python3)
  TRAINER_ARGS                 passed to `python -m smartbrush_jax.train` (--config, --workdir, ...)

example:
  launch/local_multiprocess.sh -n 2 -d 4 -- --config=configs/cpu_demo.py --workdir=runs/mp \
      --config.train.steps=3
EOF
}

die_usage() {
  echo "local_multiprocess.sh: $*" >&2
  usage >&2
  exit 2
}

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-}"
PYTHON="${PYTHON:-}"

while (($#)); do
  case "$1" in
    -n | --num-processes) (($# >= 2)) || die_usage "$1 needs a value"; NUM_PROCESSES="$2"; shift 2 ;;
    -d | --devices-per-process) (($# >= 2)) || die_usage "$1 needs a value"; DEVICES_PER_PROCESS="$2"; shift 2 ;;
    -p | --port) (($# >= 2)) || die_usage "$1 needs a value"; PORT="$2"; shift 2 ;;
    --python) (($# >= 2)) || die_usage "$1 needs a value"; PYTHON="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die_usage "unknown argument '$1' (trainer arguments go after --)" ;;
  esac
done
TRAINER_ARGS=("$@")

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_count "$NUM_PROCESSES" || die_usage "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'"
is_count "$DEVICES_PER_PROCESS" || die_usage "DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES_PER_PROCESS'"
[[ -z "$PORT" ]] || { is_count "$PORT" && ((PORT < 65536)); } || die_usage "PORT must be in 1..65535, got '$PORT'"
((${#TRAINER_ARGS[@]})) || die_usage "no trainer arguments (give at least --config=... --workdir=... after --)"
if ((BASH_VERSINFO[0] < 4)); then
  echo "local_multiprocess.sh: needs bash >= 4 (associative arrays), this is $BASH_VERSION" >&2
  exit 2
fi

if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi

# ---------------------------------------------------------------------- start the processes
# Job control: each trainer is its own process group (with its data-loader workers), so a
# terminal's Ctrl-C reaches only this script, which forwards it, and a failure can kill a
# trainer with its workers.
set -m
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec 3>&2  # this script's own messages; the wait loop silences bash's "Killed" job notices

prefix() {  # prefix LABEL: copy stdin to stdout, LABEL before each line
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do printf '%s %s\n' "$1" "$line"; done
}

trainer() {  # trainer I: become process I (a background subshell; exec keeps its pid)
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
  exec "$PYTHON" -m smartbrush_jax.train "${TRAINER_ARGS[@]}" \
    --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" --process_id="$1"
}

# ---------------------------------------------------------------------- signals
declare -A PROCESS_OF=()  # trainer pid (= its process group) -> process index
SIGNALLED=0
# shellcheck disable=SC2329  # called by the trap below
forward() {
  local pid
  SIGNALLED=$((SIGNALLED + 1))
  for pid in "${!PROCESS_OF[@]}"; do
    if ((SIGNALLED == 1)); then kill -TERM "$pid" 2>/dev/null || true; else kill -KILL -- "-$pid" 2>/dev/null || true; fi
  done
  if ((SIGNALLED == 1)); then
    echo "[launch] forwarded SIGTERM: each process saves a checkpoint and exits (signal again to kill)" >&3
  fi
}
trap forward INT TERM  # set before the first start: no process is left without it

echo "[launch] $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator localhost:$PORT" >&3
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ((i == 0)); then
    trainer "$i" > >(prefix "[p$i]") 2>&1 &
  else
    trainer "$i" > >(prefix "[p$i]" >&2) 2>&1 &
  fi
  PROCESS_OF[$!]=$i
done
set +m  # commands from here on (sleep) stay in this script's group, reached by Ctrl-C

# ---------------------------------------------------------------------- wait
# Polls rather than `wait -n`: bash may reap a finished job before `wait -n` sees it;
# `wait PID` still returns the status of a reaped child.
FIRST_FAILURE=0
while ((${#PROCESS_OF[@]})); do
  for pid in "${!PROCESS_OF[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    set +e
    wait "$pid"
    rc=$?
    set -e
    i="${PROCESS_OF[$pid]}"
    unset "PROCESS_OF[$pid]"
    if ((rc != 0 && FIRST_FAILURE == 0)); then
      FIRST_FAILURE=$rc
      echo "[launch] process $i exited with code $rc; stopping the others" >&3
      for other in "${!PROCESS_OF[@]}"; do kill -KILL -- "-$other" 2>/dev/null || true; done
    fi
  done
  sleep 0.2 || true  # a signal may cut it short
done 2>/dev/null
exit "$FIRST_FAILURE"
