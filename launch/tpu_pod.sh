#!/usr/bin/env bash
# Cloud TPU VM pod slices: create one, put this checkout and its pinned environment on every worker, run a colorjax
# command on all workers at once, follow its log, stop it, delete the slice. Multi-host: every worker runs the same
# command and jax.distributed.initialize() finds the slice from the TPU environment (mesh.distributed=auto).
#
#   launch/tpu_pod.sh create [ARGS...] | preflight ARGS... | setup | run ARGS... | ssh [COMMAND...] | logs | stop |
#                     describe | delete
#
#   create    gcloud compute tpus tpu-vm create TPU (ACCELERATOR, RUNTIME, SPOT); given colorjax ARGS, the preflight
#             below runs first and a step that does not fit the slice stops before anything is reserved
#   preflight on this machine, no TPU needed: `python -m colorjax.main ARGS --config.compile_for=COMPILE_FOR`, every
#             jitted step of ARGS compiled for the slice (per-chip memory; one that does not fit names the
#             micro-batch that would); needs libtpu here: pip install -e '.[tpu]'
#   setup     on every worker: this checkout (or REPO_URL at REF) in REPO_DIR, a venv there (REPO_DIR/.venv) with
#             `pip install -r requirements.txt -e .` and then JAX_TPU. Re-run it after changing the code.
#   run       `cd REPO_DIR && .venv/bin/python -m colorjax.main ARGS` on every worker (ARGS quoted with printf %q);
#             with LOG set it is detached (nohup) and writes LOG on each worker, so closing the ssh does not stop it
#   ssh       interactive shell on worker WORKER, or COMMAND run there
#   logs      tail LOG on worker WORKER (FOLLOW=0: print and exit)
#   stop      SIGTERM to colorjax on every worker: a training stage saves a checkpoint and exits 143 (resume with
#             --config.train.resume=True); scoring resumes by itself when re-run
#   describe  gcloud compute tpus tpu-vm describe TPU
#   delete    gcloud compute tpus tpu-vm delete TPU (asks first unless YES=1)
#
# Settings (environment variables; TPU and ZONE are required, the rest have defaults):
#   TPU            TPU VM name
#   ZONE           its zone, e.g. us-east5-a
#   PROJECT        GCP project ("" = gcloud's configured project)
#   ACCELERATOR    create: accelerator type (default v5p-64: 32 chips, 8 workers)
#   RUNTIME        create: TPU software version (default v2-alpha-tpuv5; v5e: v2-alpha-tpuv5-lite, v6e:
#                  v2-alpha-tpuv6e)
#   SPOT           create: 1 = a Spot VM (can be preempted; colorjax checkpoints on the SIGTERM)
#   CREATE_FLAGS   create: more gcloud flags, word-split (e.g. "--preemptible", "--reserved", "--network=NET")
#   SSH_FLAGS      setup/run/ssh/logs/stop: more flags for gcloud's ssh and scp (e.g. "--internal-ip",
#                  "--tunnel-through-iap")
#   REPO_DIR       checkout folder on the workers, relative to the home directory (default colorjax)
#   REPO_URL       setup: `git clone` this repository on every worker instead of copying this checkout
#   REF            setup: the branch, tag or commit of REPO_URL to check out (default main)
#   APT_PACKAGES   setup: apt packages to install first (default none). The pins need Python >= 3.11; on an image
#                  whose python3 is older (Ubuntu 22.04's 3.10): APT_PACKAGES="python3.11 python3.11-venv"
#                  REMOTE_PYTHON=python3.11
#   REMOTE_PYTHON  setup: the interpreter that creates the venv (default python3)
#   JAX_TPU        setup: the TPU build of jax (default "jax[tpu]==0.10.2", the version requirements.txt pins)
#   COMPILE_FOR    preflight: the slice to compile for (default ACCELERATOR; a topology such as v5p:2x4x4 too)
#   PREFLIGHT      create: 0 = skip the preflight (default 1)
#   PYTHON         preflight: the local interpreter (default this checkout's .venv/bin/python, else python3)
#   LOG            run: detach and write stdout+stderr to this file on each worker (relative to REPO_DIR, or
#                  absolute); logs: the file to show
#   RUN_ENV        run: NAME=VALUE words put before the command on every worker (e.g. "WANDB_MODE=offline")
#   WORKER         ssh/logs: worker number, or all (default 0)
#   FOLLOW         logs: 1 = keep following (default), 0 = print the last TAIL_LINES lines and exit
#   TAIL_LINES     logs: lines shown (default 100)
#   YES            delete: 1 = do not ask
#   GCLOUD         the gcloud binary (default gcloud)
#   DRY_RUN        1 = print the gcloud commands (one shell-quoted line each) instead of running them
#
# Examples (a v5p-64; token stores, runs and scores on gs://; BUCKET is yours):
#   export TPU=colorjax-v5p ZONE=us-east5-a
#   # compile the prior's step for the slice here first (stops if it does not fit), then create it
#   launch/tpu_pod.sh create --config configs/pretrain.py:150m --config.data.train_store=gs://BUCKET/stores/c4 \
#       --config.workdir=gs://BUCKET/runs/prior
#   launch/tpu_pod.sh setup
#   # the 150M prior (24,000 steps x 256 x 512 on C4)
#   LOG=logs/prior.log launch/tpu_pod.sh run --config configs/pretrain.py:150m \
#       --config.data.train_store=gs://BUCKET/stores/c4 --config.workdir=gs://BUCKET/runs/prior
#   LOG=logs/prior.log launch/tpu_pod.sh logs
#   # score C4 with the prior and a conditional (resumable: re-run the same command after a preemption)
#   LOG=logs/score.log launch/tpu_pod.sh run --config configs/score.py:150m \
#       --config.score.store=gs://BUCKET/stores/c4 --config.score.prior=gs://BUCKET/runs/prior/params \
#       --config.score.conditionals="('gs://BUCKET/runs/cond-tasks/params',)" --config.workdir=gs://BUCKET/scores
#   launch/tpu_pod.sh delete
#
# Older forms still work: `launch/tpu_pod.sh --setup` is `setup`, `launch/tpu_pod.sh --config ...` is `run --config ...`.
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

GCLOUD="${GCLOUD:-gcloud}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v5p-64}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
SPOT="${SPOT:-0}"
REPO_DIR="${REPO_DIR:-colorjax}"
REPO_URL="${REPO_URL:-}"
REF="${REF:-main}"
APT_PACKAGES="${APT_PACKAGES:-}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
JAX_TPU="${JAX_TPU:-jax[tpu]==0.10.2}"
LOG="${LOG:-}"
RUN_ENV="${RUN_ENV:-}"
WORKER="${WORKER:-0}"
FOLLOW="${FOLLOW:-1}"
TAIL_LINES="${TAIL_LINES:-100}"
YES="${YES:-0}"
read -r -a create_flags <<<"${CREATE_FLAGS:-}"
read -r -a ssh_flags <<<"${SSH_FLAGS:-}"

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"
}

# The flags every gcloud tpu-vm command takes: zone, and the project when one is given.
where() {
  require TPU "the TPU VM name"
  require ZONE "the TPU VM's zone, e.g. us-east5-a"
  where_flags=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then where_flags+=(--project="$PROJECT"); fi
}

# on WORKER COMMAND: run the shell command on that worker (a number or all).
on() {
  x "$GCLOUD" compute tpus tpu-vm ssh "$TPU" "${where_flags[@]}" --worker="$1" \
    ${ssh_flags[@]+"${ssh_flags[@]}"} --command "$2"
}

cmd_create() {
  where
  if (($#)); then preflight "${COMPILE_FOR:-$ACCELERATOR}" "$@"; fi
  local flags=(--accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  if [[ "$SPOT" == 1 ]]; then flags+=(--spot); fi
  x "$GCLOUD" compute tpus tpu-vm create "$TPU" "${where_flags[@]}" "${flags[@]}" \
    ${create_flags[@]+"${create_flags[@]}"}
}

cmd_preflight() {
  (($#)) || die "preflight: give the colorjax arguments, e.g. preflight --config configs/pretrain.py:150m ..."
  PREFLIGHT=1 preflight "${COMPILE_FOR:-$ACCELERATOR}" "$@"
}

cmd_setup() {
  where
  local dir steps=()
  dir=$(printf '%q' "$REPO_DIR")
  if [[ -n "$APT_PACKAGES" ]]; then
    local packages
    read -r -a packages <<<"$APT_PACKAGES"
    steps+=("sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(quote_words "${packages[@]}")")
  fi
  if [[ -n "$REPO_URL" ]]; then
    steps+=("{ test -d $dir/.git || git clone -q $(printf '%q' "$REPO_URL") $dir; }"
      "git -C $dir fetch -q origin $(printf '%q' "$REF")" "git -C $dir checkout -q --detach FETCH_HEAD")
  else
    # One tar.gz of the checkout's files (not its .venv, runs or caches), copied to every worker and unpacked over
    # REPO_DIR: re-running setup updates the code and keeps the workers' venv.
    local archive=colorjax-checkout.tgz
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
      local_archive="${TMPDIR:-/tmp}/$archive"
      echo "# pack the checkout's files into $local_archive"
    else
      local_archive=$(mktemp "${TMPDIR:-/tmp}/colorjax-checkout.XXXXXX")
      trap 'rm -f "$local_archive"' EXIT
      pack_checkout "$local_archive"
    fi
    x "$GCLOUD" compute tpus tpu-vm scp "${where_flags[@]}" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"} \
      "$local_archive" "$TPU:$archive"
    steps+=("mkdir -p $dir" "tar -xzf $archive -C $dir" "rm -f $archive")
  fi
  steps+=("cd $dir"
    "{ test -x .venv/bin/python || $(printf '%q' "$REMOTE_PYTHON") -m venv .venv; }"
    ".venv/bin/pip install -q --upgrade pip"
    ".venv/bin/pip install -q -r requirements.txt -e ."
    ".venv/bin/pip install -q $(printf '%q' "$JAX_TPU")"
    ".venv/bin/python -c 'import colorjax, jax; print(\"colorjax ready, jax\", jax.__version__)'")
  local joined="${steps[0]}" step
  for step in "${steps[@]:1}"; do joined+=" && $step"; done
  on all "$joined"
}

cmd_run() {
  where
  (($#)) || die "run: give the colorjax arguments, e.g. run --config configs/pretrain.py:150m ..."
  local env_words=() prefix="" command
  read -r -a env_words <<<"$RUN_ENV"
  if ((${#env_words[@]})); then prefix="$(quote_words "${env_words[@]}") "; fi
  command=".venv/bin/python -m colorjax.main $(quote_words "$@")"
  if [[ -z "$LOG" ]]; then
    command="$prefix$command"
  else
    # Only the nohup'd process goes to the background, its output redirected, so the ssh session can end.
    local log
    log=$(printf '%q' "$LOG")
    command="mkdir -p \"\$(dirname $log)\" && { ${prefix}nohup $command >$log 2>&1 </dev/null & echo \"\$(hostname): colorjax pid \$!, log $log\"; }"
  fi
  on all "cd $(printf '%q' "$REPO_DIR") && $command"
}

cmd_ssh() {
  where
  if (($#)); then
    on "$WORKER" "$*"
  else
    x "$GCLOUD" compute tpus tpu-vm ssh "$TPU" "${where_flags[@]}" --worker="$WORKER" \
      ${ssh_flags[@]+"${ssh_flags[@]}"}
  fi
}

cmd_logs() {
  where
  require LOG "the log file that run wrote, e.g. logs/prior.log"
  local follow=()
  if [[ "$FOLLOW" == 1 ]]; then follow=(-F); fi
  on "$WORKER" "cd $(printf '%q' "$REPO_DIR") && tail -n $(printf '%q' "$TAIL_LINES") ${follow[*]-} $(printf '%q' "$LOG")"
}

cmd_stop() {
  where
  # [c] keeps pkill from matching the shell that runs this very command.
  on all "pkill -TERM -f '[c]olorjax[.]main' || echo 'no colorjax process'"
}

cmd_describe() {
  where
  x "$GCLOUD" compute tpus tpu-vm describe "$TPU" "${where_flags[@]}"
}

cmd_delete() {
  where
  local flags=()
  if [[ "$YES" == 1 ]]; then flags=(--quiet); fi
  x "$GCLOUD" compute tpus tpu-vm delete "$TPU" "${where_flags[@]}" ${flags[@]+"${flags[@]}"}
}

subcommand="${1:-help}"
case "$subcommand" in
  create | preflight | setup | run | ssh | logs | stop | describe | delete)
    shift
    "cmd_$subcommand" "$@"
    ;;
  --setup) cmd_setup ;;
  --config | --config=*) cmd_run "$@" ;;
  help | -h | --help) usage ;;
  *)
    usage >&2
    die "unknown subcommand '$subcommand'; choose create, preflight, setup, run, ssh, logs, stop, describe or delete"
    ;;
esac
