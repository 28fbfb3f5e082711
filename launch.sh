#!/usr/bin/env bash
# Multi-process launcher for `python -m mtp_jax.main` (needs bash >= 4.4).
#
# usage: ./launch.sh local N [-d K] [main flags...]
#            N processes on this host, K CPU devices each (default 1), talking over gloo.
#            Process 0 prints as usual; process i>0 goes to stderr prefixed '[process i] '.
#            If any process fails, the others are stopped and the launcher exits non-zero.
#        ./launch.sh tpu [--dry_run] TPU_NAME ZONE [main flags...]
#            runs main --distributed on every worker of a Cloud TPU VM slice.
#        ./launch.sh tpu-setup [--dry_run] TPU_NAME ZONE [REPO_URL]
#            puts the code in ~/mtp_jax on every worker (git clone of REPO_URL, or a copy
#            of this working tree) and pip-installs it with its [tpu] extra (jax[tpu]).
#        --dry_run (anywhere on the line) prints the gcloud commands (one per line, shell-quoted)
#            instead of running them; each runs its remote command on every worker (--worker=all).
# env:   PYTHON (local, default python), TPU_PYTHON (on the workers, default python3),
#        LAUNCH_GRACE_S (seconds between TERM and KILL when stopping, default 5).
set -euo pipefail

usage() {  # usage MESSAGE: the usage text, then one line naming what is wrong
  sed -n '/^# usage:/,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  echo "error: $1" >&2
  exit 2
}

PY=${PYTHON:-python}
TPU_PY=${TPU_PYTHON:-python3}
GRACE_S=${LAUNCH_GRACE_S:-5}
REMOTE_DIR='~/mtp_jax'  # expanded by the worker's shell, not here
pids=()                 # pids[i] = pid of process i, cleared once it has been reaped
DRY_RUN=0               # 1: print the gcloud commands instead of running them

# TERM every live child, then KILL whatever is left after the grace period.
stop_all() {
  local p t alive
  for p in "${pids[@]}"; do [[ -n $p ]] && kill -TERM "$p" 2>/dev/null || true; done
  for ((t = 0; t < GRACE_S * 10; t++)); do
    alive=0
    for p in "${pids[@]}"; do [[ -n $p ]] && kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do [[ -n $p ]] && kill -KILL "$p" 2>/dev/null || true; done
}

# A bash loop rather than awk/sed: mawk buffers its input, `sed -u` is GNU-only.
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do printf '%s%s\n' "$1" "$line"; done
}

run_local() {
  local n=${1:-} k=1 port i p status
  ((!DRY_RUN)) || usage "--dry_run is for tpu and tpu-setup: local runs nothing remote"
  [[ $n =~ ^[1-9][0-9]*$ ]] || usage "local N: N='$n' is not a number of processes (1, 2, ...)"
  shift
  if [[ ${1:-} == -d ]]; then
    [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage "-d K: K='${2:-}' is not a number of CPU devices per process (1, 2, ...)"
    k=$2
    shift 2
  fi
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')

  # Children of a non-interactive shell ignore SIGINT, so Ctrl-C and TERM both become TERM
  # to every child; the EXIT trap also covers failures and errors in this script.
  trap stop_all EXIT
  trap 'echo "launch.sh: interrupted; stopping all processes" >&2; exit 130' INT
  trap 'echo "launch.sh: terminated; stopping all processes" >&2; exit 143' TERM

  for ((i = 0; i < n; i++)); do
    local cmd=("$PY" -m mtp_jax.main --coordinator_address="127.0.0.1:$port"
               --num_processes="$n" --process_id="$i" --cpu_devices="$k" "$@")
    if ((i == 0)); then
      "${cmd[@]}" &
    else
      PYTHONUNBUFFERED=1 "${cmd[@]}" > >(prefix_lines "[process $i] " >&2) 2>&1 &
    fi
    pids[i]=$!
  done

  # Poll rather than block in `wait`, so a dead process is noticed even while the others
  # hang forever in a collective that is waiting for it.
  local running=$n
  while ((running > 0)); do
    for i in "${!pids[@]}"; do
      p=${pids[i]}
      [[ -n $p ]] && ! kill -0 "$p" 2>/dev/null || continue
      status=0
      wait "$p" || status=$?
      pids[i]=''
      running=$((running - 1))
      if ((status != 0)); then
        echo "launch.sh: process $i exited with status $status; stopping the others" >&2
        exit "$status"
      fi
    done
    if ((running > 0)); then sleep 0.2; fi
  done
}

gcloud_or_print() {  # gcloud ARGS..., or under --dry_run the command line that would run
  if ((DRY_RUN)); then
    printf '%q' gcloud
    printf ' %q' "$@"
    printf '\n'
  else
    gcloud "$@"
  fi
}

tpu_ssh() {  # tpu_ssh NAME ZONE REMOTE_COMMAND: run it on every worker
  gcloud_or_print compute tpus tpu-vm ssh "$1" --zone="$2" --worker=all --command="$3"
}

check_target() {  # check_target NAME ZONE: both Cloud names, so that neither is empty or a flag
  [[ $1 =~ ^[a-z][-a-z0-9]*$ ]] \
    || usage "TPU_NAME='$1' is not a TPU name: lowercase letters, digits and hyphens, starting with a letter"
  [[ $2 =~ ^[a-z][-a-z0-9]*$ ]] || usage "ZONE='$2' is not a zone (e.g. us-central2-b); it comes right after TPU_NAME"
}

run_tpu() {
  (($# >= 2)) || usage "tpu needs TPU_NAME and ZONE before main's flags (got $# argument(s))"
  check_target "$1" "$2"
  local name=$1 zone=$2 flags=''
  shift 2
  (($# > 0)) && flags=$(printf ' %q' "$@")
  tpu_ssh "$name" "$zone" "cd $REMOTE_DIR && $TPU_PY -m mtp_jax.main --distributed$flags"
}

run_tpu_setup() {
  (($# == 2 || $# == 3)) || usage "tpu-setup takes TPU_NAME ZONE [REPO_URL] (got $# argument(s))"
  check_target "$1" "$2"
  local name=$1 zone=$2 repo=${3:-} install
  install="cd $REMOTE_DIR && $TPU_PY -m pip install -e '.[tpu]'"
  if [[ -n $repo ]]; then
    tpu_ssh "$name" "$zone" \
      "(git clone $(printf %q "$repo") $REMOTE_DIR || git -C $REMOTE_DIR pull --ff-only) && $install"
    return
  fi
  # Copy the working tree as git sees it (tracked + untracked, minus ignored runs/ and venvs).
  tmp=$(mktemp -d)  # global: the EXIT trap reads it after this function returns
  trap 'rm -rf "$tmp"' EXIT
  cd "$(dirname "${BASH_SOURCE[0]}")"
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done \
    | tar -czf "$tmp/mtp_jax.tgz" --null -T -
  if ((DRY_RUN)); then
    echo "# $tmp/mtp_jax.tgz (removed on exit): the $(tar -tzf "$tmp/mtp_jax.tgz" | wc -l) files of this working tree"
  fi
  gcloud_or_print compute tpus tpu-vm scp "$tmp/mtp_jax.tgz" "$name:" --zone="$zone" --worker=all
  tpu_ssh "$name" "$zone" \
    "mkdir -p $REMOTE_DIR && tar -xzf ~/mtp_jax.tgz -C $REMOTE_DIR && $install"
}

# --dry_run is taken from anywhere on the line (main has no flag of that name), so that no
# placement of it lets gcloud run.
args=()
for arg in "$@"; do
  case $arg in
    --dry_run | --dry-run) DRY_RUN=1 ;;
    --dry_run=* | --dry-run=*) usage "--dry_run takes no value (got '$arg')" ;;
    *) args+=("$arg") ;;
  esac
done
set -- "${args[@]}"
mode=${1:-}
(($# > 0)) && shift
case $mode in
  local) run_local "$@" ;;
  tpu) run_tpu "$@" ;;
  tpu-setup) run_tpu_setup "$@" ;;
  '') usage "no mode: pass local, tpu or tpu-setup" ;;
  *) usage "unknown mode '$mode': pass local, tpu or tpu-setup" ;;
esac
