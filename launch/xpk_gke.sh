#!/usr/bin/env bash
# TPU slices on GKE through XPK (github.com/AI-Hypercomputer/xpk, `pip install xpk`): build a container image of
# this checkout, run a colorjax command as an XPK workload (a JobSet: one pod per TPU VM host, every host running
# the same command; jax.distributed.initialize() finds the slice from the TPU environment), list, follow, delete.
# The cluster comes first, made once with `xpk cluster create --cluster CLUSTER --tpu-type v5p-64 --num-slices 1
# --zone ZONE --project PROJECT` (see xpk's README for reservations and spot capacity).
#
#   launch/xpk_gke.sh build-image | preflight ARGS... | create ARGS... | list | logs | delete
#
#   build-image  print a minimal Dockerfile for colorjax (python base, requirements.txt, JAX_TPU) to stdout; with
#                BUILD=1 build IMAGE from this checkout's files with docker instead (PUSH=1: and push it)
#   preflight    on this machine, no TPU needed: `python -m colorjax.main ARGS --config.compile_for=COMPILE_FOR`,
#                every jitted step of ARGS compiled for one slice (per-chip memory; one that does not fit names the
#                micro-batch that would); needs libtpu here: pip install -e '.[tpu]'
#   create       the preflight, then xpk workload create --cluster CLUSTER --workload WORKLOAD --tpu-type TPU_TYPE
#                --num-slices NUM_SLICES --docker-image IMAGE --command "cd APP_DIR && python3 -m colorjax.main ARGS"
#                (ARGS quoted with printf %q); a step that does not fit stops before the workload is created
#   list         xpk workload list --cluster CLUSTER
#   logs         kubectl logs of the workload's pods (all hosts, prefixed; FOLLOW=0: print and exit)
#   delete       xpk workload delete --cluster CLUSTER --workload WORKLOAD
#
# Settings (environment variables):
#   CLUSTER       the GKE cluster xpk made (required, except for build-image)
#   WORKLOAD      workload name: lowercase letters, digits and '-' (required for create, logs, delete)
#   IMAGE         container image with colorjax installed (required for create and BUILD=1), e.g.
#                 us-docker.pkg.dev/PROJECT/REPO/colorjax:TAG or gcr.io/PROJECT/colorjax:TAG
#   TPU_TYPE      create: TPU type of a slice (default v5p-64)
#   NUM_SLICES    create: slices (default 1; more than one: multislice over DCN)
#   PROJECT       GCP project ("" = gcloud's configured project)
#   ZONE          the cluster's zone ("" = gcloud's configured compute/zone)
#   PRIORITY      create: very-low | low | medium | high | very-high (default medium)
#   MAX_RESTARTS  create: times the JobSet restarts after a failure (default 0). xpk restarts on exit codes 42 and
#                 127-255, which includes colorjax's 143 after a SIGTERM: give training --config.train.resume=True so
#                 a restart continues from the last checkpoint (scoring resumes by itself)
#   XPK_FLAGS     create: more xpk flags, word-split (e.g. "--env=WANDB_MODE=offline", "--spot" on an
#                 autoprovisioning cluster, "--max-restarts=3")
#   APP_DIR       where the image holds the checkout (default /app)
#   BASE_IMAGE    build-image: Python base image (default python:3.11-slim; the pins need Python >= 3.11)
#   JAX_TPU       build-image: the TPU build of jax (default "jax[tpu]==0.10.2", the version requirements.txt pins)
#   BUILD         build-image: 1 = docker build -t IMAGE (context: this checkout's files, not its .venv or runs)
#   PUSH          build-image: 1 = docker push IMAGE after the build (needs `gcloud auth configure-docker HOST`)
#   FOLLOW        logs: 1 = keep following (default), 0 = print and exit
#   CONTAINER     logs: the workload's main container (default jax-tpu, xpk's --docker-name default)
#   XPK, KUBECTL, DOCKER  the binaries (default xpk, kubectl, docker)
#   COMPILE_FOR   preflight: the slice to compile for (default TPU_TYPE; a topology such as v5p:2x4x4 too)
#   PREFLIGHT     create: 0 = skip the preflight (default 1)
#   PYTHON        preflight: the local interpreter (default this checkout's .venv/bin/python, else python3)
#   DRY_RUN       1 = print the preflight and the xpk / kubectl / docker commands (one shell-quoted line each)
#                 instead of running them
#
# Examples (v5p-64; token stores, runs and scores on gs://; the pods' service account needs access to BUCKET):
#   export CLUSTER=colorjax-v5p ZONE=us-east5-a PROJECT=my-project IMAGE=gcr.io/my-project/colorjax:v1
#   BUILD=1 PUSH=1 launch/xpk_gke.sh build-image
#   # the 150M prior (24,000 steps x 256 x 512 on C4)
#   WORKLOAD=prior-150m launch/xpk_gke.sh create --config configs/pretrain.py:150m \
#       --config.data.train_store=gs://BUCKET/stores/c4 --config.workdir=gs://BUCKET/runs/prior
#   WORKLOAD=prior-150m launch/xpk_gke.sh logs
#   # score C4 with the prior and a conditional
#   WORKLOAD=score-c4 launch/xpk_gke.sh create --config configs/score.py:150m \
#       --config.score.store=gs://BUCKET/stores/c4 --config.score.prior=gs://BUCKET/runs/prior/params \
#       --config.score.conditionals="('gs://BUCKET/runs/cond-tasks/params',)" --config.workdir=gs://BUCKET/scores
#   WORKLOAD=score-c4 launch/xpk_gke.sh delete
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

XPK="${XPK:-xpk}"
KUBECTL="${KUBECTL:-kubectl}"
DOCKER="${DOCKER:-docker}"
TPU_TYPE="${TPU_TYPE:-v5p-64}"
NUM_SLICES="${NUM_SLICES:-1}"
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
PRIORITY="${PRIORITY:-medium}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
APP_DIR="${APP_DIR:-/app}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
JAX_TPU="${JAX_TPU:-jax[tpu]==0.10.2}"
BUILD="${BUILD:-0}"
PUSH="${PUSH:-0}"
FOLLOW="${FOLLOW:-1}"
CONTAINER="${CONTAINER:-jax-tpu}"
read -r -a xpk_flags <<<"${XPK_FLAGS:-}"

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"
}

# The flags every xpk workload command takes: cluster, and project and zone when given.
cluster_flags() {
  require CLUSTER "the GKE cluster made with xpk cluster create"
  where_flags=(--cluster="$CLUSTER")
  if [[ -n "$PROJECT" ]]; then where_flags+=(--project="$PROJECT"); fi
  if [[ -n "$ZONE" ]]; then where_flags+=(--zone="$ZONE"); fi
}

dockerfile() {
  cat <<EOF
# colorjax for Cloud TPU (written by launch/xpk_gke.sh build-image)
FROM $BASE_IMAGE
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR $APP_DIR
COPY requirements.txt ./
RUN pip install -r requirements.txt "$JAX_TPU"
COPY pyproject.toml ./
COPY colorjax/ colorjax/
COPY configs/ configs/
RUN pip install --no-deps -e .
EOF
}

cmd_build_image() {
  if [[ "$BUILD" != 1 ]]; then
    dockerfile
    return
  fi
  require IMAGE "the image to build, e.g. gcr.io/PROJECT/colorjax:TAG"
  # A global, not a local: the EXIT trap that removes it runs after this function returned.
  image_context="${TMPDIR:-/tmp}/colorjax-image"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "# put this checkout's files and the Dockerfile (build-image without BUILD=1 prints it) in $image_context"
  else
    image_context=$(mktemp -d "${TMPDIR:-/tmp}/colorjax-image.XXXXXX")
    trap 'rm -rf "$image_context"' EXIT
    pack_checkout "$image_context/checkout.tgz"
    tar -xzf "$image_context/checkout.tgz" -C "$image_context"
    rm "$image_context/checkout.tgz"
    dockerfile >"$image_context/Dockerfile"
  fi
  x "$DOCKER" build -t "$IMAGE" "$image_context"
  if [[ "$PUSH" == 1 ]]; then x "$DOCKER" push "$IMAGE"; fi
}

cmd_create() {
  cluster_flags
  require WORKLOAD "the workload name, lowercase letters, digits and '-'"
  require IMAGE "the container image with colorjax, e.g. gcr.io/PROJECT/colorjax:TAG (see build-image)"
  (($#)) || die "create: give the colorjax arguments, e.g. create --config configs/pretrain.py:150m ..."
  preflight "${COMPILE_FOR:-$TPU_TYPE}" "$@"
  local command
  command="cd $(printf '%q' "$APP_DIR") && python3 -m colorjax.main $(quote_words "$@")"
  x "$XPK" workload create "${where_flags[@]}" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
    --num-slices="$NUM_SLICES" --docker-image="$IMAGE" --priority="$PRIORITY" --max-restarts="$MAX_RESTARTS" \
    ${xpk_flags[@]+"${xpk_flags[@]}"} --command "$command"
}

cmd_preflight() {
  (($#)) || die "preflight: give the colorjax arguments, e.g. preflight --config configs/pretrain.py:150m ..."
  PREFLIGHT=1 preflight "${COMPILE_FOR:-$TPU_TYPE}" "$@"
}

cmd_list() {
  cluster_flags
  x "$XPK" workload list "${where_flags[@]}"
}

cmd_logs() {
  require WORKLOAD "the workload whose logs to show"
  local follow=()
  if [[ "$FOLLOW" == 1 ]]; then follow=(--follow); fi
  # kubectl talks to the cluster of its current context (xpk sets it: gcloud container clusters get-credentials).
  x "$KUBECTL" logs --selector="jobset.sigs.k8s.io/jobset-name=$WORKLOAD" --container="$CONTAINER" \
    --prefix --max-log-requests=256 --tail=-1 ${follow[@]+"${follow[@]}"}
}

cmd_delete() {
  cluster_flags
  require WORKLOAD "the workload to delete"
  x "$XPK" workload delete "${where_flags[@]}" --workload="$WORKLOAD"
}

subcommand="${1:-help}"
case "$subcommand" in
  build-image | preflight | create | list | logs | delete)
    shift
    "cmd_${subcommand//-/_}" "$@"
    ;;
  help | -h | --help) usage ;;
  *)
    usage >&2
    die "unknown subcommand '$subcommand'; choose build-image, preflight, create, list, logs or delete"
    ;;
esac
