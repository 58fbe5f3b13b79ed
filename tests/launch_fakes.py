"""Stand-ins for `gcloud` and what a TPU worker runs, to test launch/tpu_vm.sh for real
(not only its --dry-run output): the slice is two folders used as the workers' $HOME."""

import os
import subprocess

from train_helpers import ROOT

TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")

FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""Stands in for `gcloud [alpha] compute tpus {queued-resources,tpu-vm} ...` on a slice of two
workers, each a folder ($FAKE_DIR/worker{0,1}) used as the worker's $HOME; ssh runs the
command there for real. The queued resource's state lives in $FAKE_DIR/qr_state (first
from $FAKE_STATE): create makes it ACTIVE, delete removes it."""
import os, shutil, subprocess, sys
args, fake = sys.argv[1:], os.environ["FAKE_DIR"]
with open(os.path.join(fake, "gcloud.log"), "a") as f:
    f.write(" ".join(args) + "\n")
if args[0] == "alpha":
    args = args[1:]
kind, verb = args[2], args[3]
workers = [os.path.join(fake, f"worker{i}") for i in range(2)]
state_file = os.path.join(fake, "qr_state")
if not os.path.exists(state_file):
    open(state_file, "w").write(os.environ.get("FAKE_STATE", ""))
if verb == "describe":
    state = open(state_file).read()
    print(state) if state else sys.exit("ERROR: (gcloud) NOT_FOUND")
elif verb == "create":
    open(state_file, "w").write("ACTIVE")
    for w in workers:
        os.makedirs(w, exist_ok=True)
elif verb == "delete":
    open(state_file, "w").write("")
elif verb == "scp":
    for w in workers:
        shutil.copy(args[4], os.path.join(w, args[5].split(":", 1)[1]))
elif verb == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    rc = 0
    for w in workers:
        env = dict(os.environ, HOME=w, PATH=os.environ["FAKE_BIN"] + ":" + os.environ["PATH"])
        rc = rc or subprocess.run(["bash", "-c", command], env=env, cwd=w).returncode
    sys.exit(rc)
'''

# what the workers' setup calls: python3.11 makes a venv whose pip and python are stand-ins
FAKE_WORKER_BIN = {
    "python3.11": r'''#!/usr/bin/env bash
[[ "$1 $2" == "-m venv" ]] || exit 1
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\n[[ $FAKE_MODE != install_fails ]] || { echo "pip: no network" >&2; exit 1; }\n' \
  > "$3/bin/pip"
printf '#!/usr/bin/env bash\necho "trainer $*" >> "$HOME/trainer_calls"\n' > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
''',
    "gcsfuse": "#!/usr/bin/env bash\nexit 0\n",
    "mountpoint": "#!/usr/bin/env bash\nexit 1\n",
}


def run_tpu_vm(tmp_path, state, mode, *args, workdir="gs://b/r"):
    """Runs launch/tpu_vm.sh with the stand-ins: `state` is the queued resource's state
    ("" none, "ACTIVE", "SUSPENDED", ...), `mode` the workers' ("ok", "install_fails").
    Returns (process, the gcloud calls as text, the fake folder)."""
    fake, fake_bin, gbin = tmp_path / "fake", tmp_path / "worker_bin", tmp_path / "bin"
    for d in (fake, fake_bin, gbin):
        d.mkdir(exist_ok=True)
    (gbin / "gcloud").write_text(FAKE_GCLOUD)
    for name, text in FAKE_WORKER_BIN.items():
        (fake_bin / name).write_text(text)
    for f in list(gbin.iterdir()) + list(fake_bin.iterdir()):
        f.chmod(0o755)
    if state:  # the VM exists already
        for i in range(2):
            (fake / f"worker{i}").mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{gbin}:{os.environ['PATH']}", FAKE_DIR=str(fake), FAKE_BIN=str(fake_bin),
               FAKE_STATE=state, FAKE_MODE=mode, POLL_SECONDS="0")
    if (fake / "qr_state").exists():
        (fake / "qr_state").unlink()  # each launch starts from the state asked for
    for k in ("WORKDIR", "ZONE", "KEEP_VM", "DETACH", "SKIP_SETUP"):
        env.pop(k, None)
    p = subprocess.run([TPU_VM, "--zone=z", "--name=sb", f"--workdir={workdir}", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    calls = (fake / "gcloud.log").read_text() if (fake / "gcloud.log").exists() else ""
    return p, calls, fake


