#!/usr/bin/env bash
# Trains on Cloud TPU (v4-32 by default: 4 hosts x 4 chips), as Google documents it today:
# chips are requested as a queued resource (a plain create fails at once when the zone has
# no capacity; a queued request waits for it), the runtime version follows from the
# accelerator type, maintenance events arrive as SIGTERM where Autocheckpoint exists, and
# the run writes its workdir straight to Cloud Storage (gs://...: Orbax through TensorStore,
# finished steps marked by a commit file, never by a rename through gcsfuse).
#
#   WORKDIR=gs://bucket/runs/sb ZONE=us-central2-b launch/tpu_vm.sh --data-bucket=bucket -- \
#       --config.model.init_from=gs://bucket/models/stable-diffusion-v1-2 \
#       --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_prepared",)'
#   launch/tpu_vm.sh --dry-run --zone=us-central2-b --workdir=gs://bucket/runs/sb   # print the commands
#
# Relaunching the same command resumes: an ACTIVE slice is reused (unless a trainer runs on
# it), a preempted Spot slice (its queued resource SUSPENDED or FAILED) is deleted and asked
# for again, and the trainer resumes from the newest checkpoint in the bucket.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] [-- TRAINER_ARGS...]

  --workdir=gs://B/PATH     checkpoints, metrics, samples: a Cloud Storage URL every worker writes
                            (env WORKDIR, required; a local path would be each worker's own disk)
  --zone=ZONE               TPU zone, e.g. us-central2-b (env ZONE, required)
  --project=PROJECT         GCP project (env PROJECT, default: gcloud's configured one)
  --name=NAME               queued resource and TPU VM name (env TPU_NAME, default smartbrush)
  --accelerator-type=TYPE   slice type: v4-32, v5litepod-16, v5p-128, v6e-256, ... (env ACCELERATOR_TYPE,
                            default v4-32)
  --runtime-version=V       TPU software (env RUNTIME_VERSION, default: the one for the accelerator type)
  --slices=N                multislice: N slices joined over the data-centre network (env SLICES, default 1);
                            the trainer gets --config.mesh.dcn_shape.data=N
  --spot                    Spot capacity (env SPOT=1); a preempted slice is asked for again on relaunch
  --data-bucket=B           mount bucket B read-only with gcsfuse at /mnt/gcs/B on every worker, with a
                            file cache, for data folders (Grain reads shards from local paths) (env DATA_BUCKET)
  --config=FILE             trainer config (env CONFIG, default configs/tpu_v4.py)
  --skip-setup              reuse the code and venv already on the workers (env SKIP_SETUP=1)
  --detach                  start training under nohup and return (env DETACH=1); log in ~/smartbrush/train.log
  --delete                  delete the queued resource and its slices when the run ends, also on failure, if
                            this run created them (env KEEP_VM=0); one that was there is kept
  --dry-run                 print every command instead of running it
  TRAINER_ARGS              more trainer flags, e.g. --config.model.init_from=... (after --)
EOF
}

die_usage() {
  echo "tpu_vm.sh: $*" >&2
  usage >&2
  exit 2
}

WORKDIR="${WORKDIR:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
TPU_NAME="${TPU_NAME:-smartbrush}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SLICES="${SLICES:-1}"
SPOT="${SPOT:-0}"
DATA_BUCKET="${DATA_BUCKET:-}"
CONFIG="${CONFIG:-configs/tpu_v4.py}"
SKIP_SETUP="${SKIP_SETUP:-0}"
DETACH="${DETACH:-0}"
KEEP_VM="${KEEP_VM:-1}"
DRY_RUN=0

while (($#)); do
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --name=*) TPU_NAME="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --slices=*) SLICES="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --data-bucket=*) DATA_BUCKET="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --detach) DETACH=1 ;;
    --delete) KEEP_VM=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die_usage "unknown argument '$1' (trainer arguments go after --)" ;;
  esac
  shift
done
TRAINER_ARGS=("$@")

[[ -n "$WORKDIR" ]] || die_usage "WORKDIR is required (--workdir=gs://BUCKET/PATH): storage every worker shares"
[[ "$WORKDIR" == gs://?* ]] || die_usage "WORKDIR must be a gs:// URL, got '$WORKDIR': a local path would be a different disk on every worker"
[[ -n "$ZONE" ]] || die_usage "ZONE is required (--zone=ZONE, e.g. us-central2-b for v4)"
[[ -n "$TPU_NAME" ]] || die_usage "TPU_NAME must not be empty"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die_usage "--slices must be a positive integer, got '$SLICES'"
[[ -f "$ROOT/$CONFIG" ]] || die_usage "config $CONFIG not found in $ROOT (a path relative to the repository)"
((DETACH == 0 || KEEP_VM == 1)) || die_usage "--detach and --delete exclude each other (the run would lose its VM)"
JAX_VERSION="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")"
[[ -n "$JAX_VERSION" ]] || { echo "tpu_vm.sh: no jax==VERSION pin in requirements.txt" >&2; exit 2; }

# The TPU software per accelerator generation (Cloud TPU's runtime versions), and the
# generations where Autocheckpoint turns a maintenance event into a SIGTERM with up to 5
# minutes to save (v2-v4 and v5e; elsewhere maintenance stops the run without warning and
# the last periodic checkpoint is what resumes).
case "$ACCELERATOR_TYPE" in
  v4-*) default_runtime=tpu-ubuntu2204-base; autocheckpoint=1 ;;
  v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite; autocheckpoint=1 ;;
  v5p-*) default_runtime=v2-alpha-tpuv5; autocheckpoint=0 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e; autocheckpoint=0 ;;
  *) die_usage "unknown accelerator type '$ACCELERATOR_TYPE' (v4-N, v5litepod-N, v5p-N, v6e-N)" ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"

LOC=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || LOC+=(--project="$PROJECT")
QR=(gcloud compute tpus queued-resources)
TPU=(gcloud compute tpus tpu-vm)
if ((SLICES > 1)); then
  NODES=()
  for ((i = 0; i < SLICES; i++)); do NODES+=("$TPU_NAME-$i"); done
else
  NODES=("$TPU_NAME")
fi

quote() {  # quote ARGS...: one shell word per argument, single-quoted where needed
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    elif [[ "$a" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value'
      out+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}'")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # run CMD...: run it, or print it under --dry-run
  if ((DRY_RUN)); then echo "+ $(quote "$@")"; else echo "+ $(quote "$@")" >&2; "$@"; fi
}

qr_state() {  # the queued resource's state, "" when there is none
  "${QR[@]}" describe "$TPU_NAME" "${LOC[@]}" --format='value(state.state)' 2>/dev/null || true
}

# ---------------------------------------------------------------------- the slice(s)
if ((DRY_RUN)); then
  run "${QR[@]}" describe "$TPU_NAME" "${LOC[@]}" --format='value(state.state)'
  echo "# if describe finds no queued resource:"
  state=""
else
  echo "+ $(quote "${QR[@]}" describe "$TPU_NAME" "${LOC[@]}" --format='value(state.state)')" >&2
  state="$(qr_state)"
fi
created=0  # --delete removes only what this run created, never what it found
case "$state" in
  SUSPENDED | SUSPENDING | FAILED)  # preempted (Spot) or never provisioned: its VMs are gone
    echo "tpu_vm.sh: queued resource $TPU_NAME is $state (preempted or failed): deleting it and asking again" >&2
    run "${QR[@]}" delete "$TPU_NAME" "${LOC[@]}" --force --quiet
    state="" ;;
esac
if [[ -z "$state" ]]; then
  create=("${QR[@]}" create "$TPU_NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --runtime-version="$RUNTIME_VERSION")
  if ((SLICES > 1)); then create+=(--node-count="$SLICES" --node-prefix="$TPU_NAME"); else create+=(--node-id="$TPU_NAME"); fi
  ((SPOT == 0)) || create+=(--spot)
  if ((autocheckpoint)); then  # a preview flag: the alpha command
    create=(gcloud alpha "${create[@]:1}" --autocheckpoint-enabled)
  fi
  run "${create[@]}"
  created=1
  state=WAITING_FOR_RESOURCES
fi
if ((DRY_RUN == 0)); then
  waited=0
  while [[ "$state" != ACTIVE ]]; do
    case "$state" in
      SUSPENDED | SUSPENDING | FAILED)
        echo "tpu_vm.sh: queued resource $TPU_NAME became $state; see '${QR[*]} describe $TPU_NAME --zone=$ZONE'" >&2
        exit 1 ;;
    esac
    ((waited % 300 == 0)) && echo "tpu_vm.sh: queued resource $TPU_NAME is $state; waiting for capacity..." >&2
    sleep "${POLL_SECONDS:-30}"
    waited=$((waited + ${POLL_SECONDS:-30}))
    state="$(qr_state)"
  done
  ((created)) || echo "reusing the ACTIVE slice(s) of $TPU_NAME" >&2
fi

delete_qr() { run "${QR[@]}" delete "$TPU_NAME" "${LOC[@]}" --force --quiet; }
if ((KEEP_VM == 0)); then
  if ((created)); then
    ((DRY_RUN)) || trap delete_qr EXIT  # also when a step below fails
  else
    echo "tpu_vm.sh: --delete: $TPU_NAME existed before this run, so it is kept" >&2
    KEEP_VM=1
  fi
fi

on_workers() {  # on_workers COMMAND: run a shell command on every worker of every slice, output streamed here
  local node pids=() rc=0
  for node in "${NODES[@]}"; do
    if ((DRY_RUN || ${#NODES[@]} == 1)); then
      run "${TPU[@]}" ssh "$node" "${LOC[@]}" --worker=all --command="$1"
    else
      run "${TPU[@]}" ssh "$node" "${LOC[@]}" --worker=all --command="$1" &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  return "$rc"
}

# ---------------------------------------------------------------------- a run already there?
# Relaunching over a live run would start a second trainer on the same chips (and the
# setup below replaces the code under it): refuse while any worker has a trainer running
# in ~/smartbrush. The pattern's [.] keeps pgrep from matching this check's own shell.
# Remote paths use the ssh user's own home (~), whatever its name (OS Login).
if ((created == 0)); then
  running_check='for p in $(pgrep -f "smartbrush_jax[.]train" || true); do
  if [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$HOME/smartbrush" ]; then
    echo "SMARTBRUSH_RUNNING $(hostname) pid $p"
  fi
done'
  if ((DRY_RUN)); then
    on_workers "$running_check"
  else
    echo "+ (on every worker) is a trainer running in ~/smartbrush?" >&2
    found=""
    for node in "${NODES[@]}"; do
      found+="$("${TPU[@]}" ssh "$node" "${LOC[@]}" --worker=all --command="$running_check" 2>&1 || true)"$'\n'
    done
    if grep -q SMARTBRUSH_RUNNING <<<"$found"; then
      echo "tpu_vm.sh: a trainer is already running on $TPU_NAME:" >&2
      grep SMARTBRUSH_RUNNING <<<"$found" | sed 's/^.*SMARTBRUSH_RUNNING /  /' >&2
      echo "tpu_vm.sh: not starting a second one. Follow it with" \
           "'${TPU[*]} ssh ${NODES[0]} --zone=$ZONE --worker=0 --command=\"tail -f ~/smartbrush/train.log\"'," \
           "or stop it ('... --worker=all --command=\"pkill -TERM -f smartbrush_jax.train\"': it saves and exits)" >&2
      exit 1
    fi
  fi
fi

# ---------------------------------------------------------------------- code and environment
# The tarball holds the checked-out commit plus uncommitted changes to tracked files
# (`git stash create`); untracked files are not sent.
if ((SKIP_SETUP == 0)); then
  tarball="${TMPDIR:-/tmp}/smartbrush-$TPU_NAME.tar.gz"
  if ((DRY_RUN)); then
    # shellcheck disable=SC2016  # printed, not run
    rev='$(git stash create || true)'
    echo "+ git -C $(quote "$ROOT") archive --format=tar.gz -o $(quote "$tarball") \${rev:-HEAD}  # rev=$rev"
  else
    rev="$(git -C "$ROOT" stash create || true)"
    run git -C "$ROOT" archive --format=tar.gz -o "$tarball" "${rev:-HEAD}"
  fi
  for node in "${NODES[@]}"; do
    run "${TPU[@]}" scp "$tarball" "$node:smartbrush.tar.gz" "${LOC[@]}" --worker=all
  done
  ((DRY_RUN)) || rm -f "$tarball"
  # Python 3.11 (the version the pins are for) from the deadsnakes PPA where the image has
  # none; torch's CPU build (it is only used off the TPU path: export, parity tests).
  setup="set -euo pipefail
mkdir -p ~/smartbrush && cd ~/smartbrush
find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name '*.log' -exec rm -rf {} +  # keep the venv and old logs
tar -xzf ~/smartbrush.tar.gz
if ! command -v python3.11 >/dev/null; then
  sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q
  sudo apt-get install -y -q python3.11 python3.11-venv
fi
test -x .venv/bin/python || python3.11 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt --extra-index-url https://download.pytorch.org/whl/cpu
.venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION'
.venv/bin/pip install -q --no-deps -e ."
  if [[ -n "$DATA_BUCKET" ]]; then  # gcsfuse's apt repository, as its docs give it
    setup+="
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi"
  fi
  on_workers "$setup"
fi

# ---------------------------------------------------------------------- train
mount=""
if [[ -n "$DATA_BUCKET" ]]; then  # data only, read-only, with a local file cache: never the workdir
  mnt="/mnt/gcs/$(quote "$DATA_BUCKET")"
  mount="sudo mkdir -p $mnt /tmp/gcsfuse-cache && sudo chown \$(id -u) $mnt /tmp/gcsfuse-cache
mountpoint -q $mnt || gcsfuse -o ro --implicit-dirs --file-cache-max-size-mb=-1 --cache-dir=/tmp/gcsfuse-cache \
--metadata-cache-ttl-secs=-1 $(quote "$DATA_BUCKET") $mnt
"
fi
train_args=(--config="$CONFIG" --workdir="$WORKDIR" --distributed)
((SLICES == 1)) || train_args+=(--config.mesh.dcn_shape.data="$SLICES")
train=".venv/bin/python -m smartbrush_jax.train $(quote "${train_args[@]}")"
((${#TRAINER_ARGS[@]} == 0)) || train+=" $(quote "${TRAINER_ARGS[@]}")"
if ((DETACH)); then
  on_workers "set -euo pipefail
cd ~/smartbrush
${mount}PYTHONUNBUFFERED=1 nohup $train >> train.log 2>&1 < /dev/null &
echo \"\$(hostname): training in the background, log in ~/smartbrush/train.log\""
  echo "follow the logs: $(quote "${TPU[@]}" ssh "${NODES[0]}" "${LOC[@]}" --worker=0 \
       --command='tail -f ~/smartbrush/train.log')"
else
  # Every worker's lines come back prefixed with its hostname. Closing this ssh session
  # (Ctrl-C, a dropped connection) hangs up the trainers: use --detach for long runs.
  on_workers "set -euo pipefail
cd ~/smartbrush
${mount}PYTHONUNBUFFERED=1 $train 2>&1 | sed -u \"s/^/[\$(hostname)] /\""
fi
((DRY_RUN == 0 || KEEP_VM == 1)) || delete_qr  # (a real run deletes through the EXIT trap)
