#!/usr/bin/env bash
# Simulate a multi-host job on one machine: N processes on the CPU, each with D devices, talking over gloo.
# Useful to check that a stage's multi-host paths (per-host data loading, per-host writes) behave.
#
#   HOSTS=2 DEVICES=4 [PYTHON=.venv/bin/python] launch/local_hosts.sh --config configs/pretrain.py:tiny --config.data.train_store=...
#
# Settings (environment variables): HOSTS processes (default 2); DEVICES CPU devices per process (default 4);
# PYTHON interpreter (default python3); PORT coordinator port on localhost (default a random one in 20000-29999);
# DRY_RUN=1 prints each process's command (one shell-quoted line each) instead of starting them.
# Exits with the status of a failed process (0 when all succeed).
set -euo pipefail
HOSTS="${HOSTS:-2}"; DEVICES="${DEVICES:-4}"; PYTHON="${PYTHON:-python3}"; PORT="${PORT:-$((20000 + RANDOM % 10000))}"
pids=()
for ((i = 0; i < HOSTS; i++)); do
  env_words=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
    JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$HOSTS" JAX_PROCESS_ID="$i")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' env "${env_words[@]}" "$PYTHON" -m colorjax.main "$@"
    printf '\n'
    continue
  fi
  env "${env_words[@]}" "$PYTHON" -m colorjax.main "$@" &
  pids+=($!)
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || status=$?; done
exit $status
