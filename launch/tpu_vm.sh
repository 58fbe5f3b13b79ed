#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (v4-32 by default: 4 hosts x 4 chips): creates the slice
# or reuses it, copies this checkout (a `git archive` tarball) to every worker, installs
# it, runs the trainer on every worker with --distributed (jax.distributed.initialize()
# finds the slice's hosts from the TPU metadata) and streams the logs; optionally deletes
# the slice afterwards.
#
#   WORKDIR=gs://bucket/runs/sb ZONE=us-central2-b launch/tpu_vm.sh -- \
#       --config.model.init_from=/home/me/gcs/bucket/models/stable-diffusion-v1-2 \
#       --config.data.prepared_dirs='("/home/me/gcs/bucket/data/coco_prepared",)'
#   launch/tpu_vm.sh --dry-run --zone=us-central2-b --workdir=gs://bucket/runs/sb   # print the commands
#
# The workdir must be shared by all workers (every process writes its shards of each
# checkpoint). The trainer reads and writes POSIX paths, so a gs:// WORKDIR is mounted with
# gcsfuse on every worker at $HOME/gcs/BUCKET and the trainer gets that path (--no-gcsfuse
# passes the gs:// path through unchanged). Data and model folders must be readable on
# every worker: put them in the same bucket and use the mounted path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] [-- TRAINER_ARGS...]

  --workdir=gs://B/PATH     checkpoints, metrics, samples (env WORKDIR, required)
  --zone=ZONE               TPU zone, e.g. us-central2-b (env ZONE, required)
  --project=PROJECT         GCP project (env PROJECT, default: gcloud's configured one)
  --name=NAME               TPU VM name (env TPU_NAME, default smartbrush-$USER)
  --accelerator-type=TYPE   slice type (env ACCELERATOR_TYPE, default v4-32)
  --runtime-version=V       TPU software version (env RUNTIME_VERSION, default tpu-ubuntu2204-base)
  --config=FILE             trainer config (env CONFIG, default configs/tpu_v4.py)
  --spot                    create a Spot slice (env SPOT=1); preempted runs resume on re-launch
  --skip-setup              reuse the code and venv already on the workers (env SKIP_SETUP=1)
  --no-gcsfuse              pass a gs:// workdir to the trainer as is (env GCSFUSE=0)
  --detach                  start training under nohup and return (env DETACH=1); log in ~/smartbrush/train.log
  --delete                  delete the slice when the run ends, also on failure, if this run
                            created it (env KEEP_VM=0); a slice that was there is kept
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
TPU_NAME="${TPU_NAME:-smartbrush-${USER:-tpu}}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/tpu_v4.py}"
SPOT="${SPOT:-0}"
SKIP_SETUP="${SKIP_SETUP:-0}"
GCSFUSE="${GCSFUSE:-1}"
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
    --config=*) CONFIG="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --no-gcsfuse) GCSFUSE=0 ;;
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
[[ -n "$ZONE" ]] || die_usage "ZONE is required (--zone=ZONE, e.g. us-central2-b for v4)"
[[ -n "$TPU_NAME" ]] || die_usage "TPU_NAME must not be empty"
[[ -f "$ROOT/$CONFIG" ]] || die_usage "config $CONFIG not found in $ROOT (a path relative to the repository)"
((DETACH == 0 || KEEP_VM == 1)) || die_usage "--detach and --delete exclude each other (the run would lose its VM)"
JAX_VERSION="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")"
[[ -n "$JAX_VERSION" ]] || { echo "tpu_vm.sh: no jax==VERSION pin in requirements.txt" >&2; exit 2; }

GCLOUD_LOC=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_LOC+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

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

# ---------------------------------------------------------------------- the slice
if ((DRY_RUN)); then
  run "${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_LOC[@]}" --format='value(state)'
  echo "# if describe finds no slice:"
  state=""
else
  echo "+ $(quote "${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_LOC[@]}" --format='value(state)')" >&2
  state="$("${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_LOC[@]}" --format='value(state)' 2>/dev/null || true)"
fi
created=0  # --delete removes only a VM this run created, never one it found
if [[ -z "$state" ]]; then
  create=("${TPU[@]}" create "$TPU_NAME" "${GCLOUD_LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$RUNTIME_VERSION")
  ((SPOT == 0)) || create+=(--spot)
  run "${create[@]}"
  created=1
elif [[ "$state" != READY ]]; then
  echo "tpu_vm.sh: TPU VM $TPU_NAME exists in state $state, not READY; delete it" \
       "(${TPU[*]} delete $TPU_NAME --zone=$ZONE) or wait, then run again" >&2
  exit 1
else
  echo "reusing TPU VM $TPU_NAME ($state)" >&2
fi

delete_vm() { run "${TPU[@]}" delete "$TPU_NAME" "${GCLOUD_LOC[@]}" --quiet; }
if ((KEEP_VM == 0)); then
  if ((created)); then
    ((DRY_RUN)) || trap delete_vm EXIT  # also when a step below fails
  else
    echo "tpu_vm.sh: --delete: $TPU_NAME existed before this run, so it is kept" >&2
    KEEP_VM=1
  fi
fi

ssh_all() {  # ssh_all COMMAND: run a shell command on every worker, output streamed here
  run "${TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_LOC[@]}" --worker=all --command="$1"
}

# ---------------------------------------------------------------------- a run already there?
# Relaunching over a live run would start a second trainer on the same chips (and the
# setup below replaces the code under it): refuse while any worker has a trainer running
# in ~/smartbrush. The pattern's [.] keeps pgrep from matching this check's own shell.
if ((created == 0)); then
  running_check='for p in $(pgrep -f "smartbrush_jax[.]train" || true); do
  if [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$HOME/smartbrush" ]; then
    echo "SMARTBRUSH_RUNNING $(hostname) pid $p"
  fi
done'
  if ((DRY_RUN)); then
    ssh_all "$running_check"
  else
    echo "+ (on every worker) is a trainer running in ~/smartbrush?" >&2
    found="$("${TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_LOC[@]}" --worker=all --command="$running_check" 2>&1 || true)"
    if grep -q SMARTBRUSH_RUNNING <<<"$found"; then
      echo "tpu_vm.sh: a trainer is already running on $TPU_NAME:" >&2
      grep SMARTBRUSH_RUNNING <<<"$found" | sed 's/^.*SMARTBRUSH_RUNNING /  /' >&2
      echo "tpu_vm.sh: not starting a second one. Follow it with" \
           "'${TPU[*]} ssh $TPU_NAME --zone=$ZONE --worker=0 --command=\"tail -f ~/smartbrush/train.log\"'," \
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
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:smartbrush.tar.gz" "${GCLOUD_LOC[@]}" --worker=all
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
  if ((GCSFUSE)) && [[ "$WORKDIR" == gs://* ]]; then  # gcsfuse's apt repository, as its docs give it
    setup+="
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi"
  fi
  ssh_all "$setup"
fi

# ---------------------------------------------------------------------- train
remote_workdir="$(quote "$WORKDIR")"
mount=""
if ((GCSFUSE)) && [[ "$WORKDIR" == gs://* ]]; then
  path="${WORKDIR#gs://}"
  bucket="${path%%/*}"
  rest="${path#"$bucket"}"
  remote_workdir="\$HOME/gcs/$(quote "$bucket$rest")"
  mount="mkdir -p \$HOME/gcs/$(quote "$bucket")
mountpoint -q \$HOME/gcs/$(quote "$bucket") || gcsfuse --implicit-dirs $(quote "$bucket") \$HOME/gcs/$(quote "$bucket")
"
fi
train=".venv/bin/python -m smartbrush_jax.train --config=$(quote "$CONFIG") --workdir=$remote_workdir --distributed"
((${#TRAINER_ARGS[@]} == 0)) || train+=" $(quote "${TRAINER_ARGS[@]}")"
if ((DETACH)); then
  ssh_all "set -euo pipefail
cd ~/smartbrush
${mount}PYTHONUNBUFFERED=1 nohup $train >> train.log 2>&1 < /dev/null &
echo \"\$(hostname): training in the background, log in ~/smartbrush/train.log\""
  echo "follow the logs: $(quote "${TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_LOC[@]}" --worker=0 \
       --command='tail -f ~/smartbrush/train.log')"
else
  # Every worker's lines come back prefixed with its hostname. Closing this ssh session
  # (Ctrl-C, a dropped connection) hangs up the trainers: use --detach for long runs.
  ssh_all "set -euo pipefail
cd ~/smartbrush
${mount}PYTHONUNBUFFERED=1 $train 2>&1 | sed -u \"s/^/[\$(hostname)] /\""
fi
((DRY_RUN == 0 || KEEP_VM == 1)) || delete_vm  # (a real run deletes through the EXIT trap)
