#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head node and worker node(s), each a
# `ray start` with its own CPUs, a custom resource and a capped object store; the dashboard
# and job server on 127.0.0.1:8265.
#
#   cluster/local.sh up        # then: RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 ...
#   cluster/local.sh status
#   cluster/local.sh down
#
# Settings (environment): WORKERS (1), HEAD_CPUS (1), WORKER_CPUS (2), OBJECT_STORE_BYTES
# (300 MB per node), GCS_PORT (6380), DASHBOARD_PORT (8265), RAY_TMPDIR (/tmp), RAY (the `ray` to use: the
# project's .venv when present, so jobs' `python` is the one with mmray installed).
#
# Authentication: token auth, Ray 2.60's default (the token in ~/.ray/auth_token, made here if
# there is none). `ray job submit` and `serve deploy` send it with RAY_AUTH_MODE=token; a
# driver started on this machine (`mmray train ...` joining the cluster) finds the token by
# itself. (This cluster once ran with auth disabled, but a local driver that found the token
# then turned auth on for itself alone, and every task it passed an object to failed with
# OwnerDiedError: both sides must agree.)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
WORKERS=${WORKERS:-1}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-2}
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-300000000}
GCS_PORT=${GCS_PORT:-6380}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
TEMP_ROOT=${RAY_TMPDIR:-/tmp}  # the head uses $TEMP_ROOT/ray, worker node i $TEMP_ROOT/ray-worker-i
if [ -z "${RAY:-}" ]; then
  if [ -x "$root/.venv/bin/ray" ]; then RAY=$root/.venv/bin/ray; else RAY=$(command -v ray); fi
fi
# The job driver runs `python` from the PATH of the node that starts it: the project's.
export PATH="$(dirname "$RAY"):$PATH"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
# Idle worker processes stay 10 minutes (Ray's default past num_cpus: 1 s), so a job's
# datasets and evaluations reuse them instead of starting new ones (pipelines/job.py).
export RAY_idle_worker_killing_time_threshold_ms=${RAY_idle_worker_killing_time_threshold_ms:-600000}
# Ray Data's console at warnings (every epoch of training ends a read with an INFO line); its
# log file keeps everything.
export RAY_DATA_LOGGING_CONFIG=${RAY_DATA_LOGGING_CONFIG:-$root/pipelines/ray_data_logging.yaml}
# No node of this cluster is ever drained: Ray Train's preemption watcher only adds an
# error-level line to every training run (pipelines/__init__.py).
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=${RAY_TRAIN_ENABLE_PREEMPTION_WATCHER:-0}
# Ray Train's DatasetManager warns of a Ray Data option it sets itself (pipelines/__init__.py).
export PYTHONWARNINGS=${PYTHONWARNINGS:-"ignore:\`ExecutionOptions.exclude_resources\` is deprecated"}
dashboard=http://127.0.0.1:$DASHBOARD_PORT

dashboard_get() {  # the dashboard asks for the token, as the job CLI sends it
  local token
  token=$(cat "$HOME/.ray/auth_token" 2>/dev/null || true)
  curl -sf -H "Authorization: Bearer $token" "$dashboard$1" 2>/dev/null
}

nodes_alive() {
  dashboard_get "/nodes?view=summary" |
    python3 -c 'import json, sys; print(sum(n["raylet"]["state"] == "ALIVE" for n in json.load(sys.stdin)["data"]["summary"]))' 2>/dev/null ||
    echo 0
}

up() {
  if dashboard_get /api/version >/dev/null; then
    echo "a Ray dashboard already answers on $dashboard: run '$0 down' first" >&2
    exit 1
  fi
  "$RAY" get-auth-token --generate >/dev/null  # the token, unless ~/.ray/auth_token exists
  echo "starting the head node (127.0.0.1:$GCS_PORT, $HEAD_CPUS CPU, dashboard $dashboard)"
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --num-cpus="$HEAD_CPUS" --resources='{"head_node": 1}' \
    --object-store-memory="$OBJECT_STORE_BYTES" --include-dashboard=true \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats >/dev/null
  for i in $(seq 1 "$WORKERS"); do
    echo "starting worker node $i ($WORKER_CPUS CPU)"
    # Each node its own temp dir: nodes sharing one would share the session's
    # runtime_resources/, and a worker node installing a job's working_dir there replaced
    # the folder the job's driver runs in (its cwd vanished as soon as it called ray.init).
    "$RAY" start --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
      --num-cpus="$WORKER_CPUS" --resources='{"worker_node": 1}' \
      --temp-dir="$TEMP_ROOT/ray-worker-$i" \
      --object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats >/dev/null
  done
  want=$((WORKERS + 1))
  for _ in $(seq 1 120); do
    [ "$(nodes_alive)" -ge "$want" ] && break
    sleep 1
  done
  if [ "$(nodes_alive)" -lt "$want" ]; then
    echo "only $(nodes_alive) of $want nodes came up" >&2
    exit 1
  fi
  echo "up: $want nodes. Submit jobs with:"
  echo "  RAY_AUTH_MODE=token ray job submit --address $dashboard --working-dir . -- python -m pipelines.curate ..."
}

status() {
  if ! dashboard_get /api/version >/dev/null; then
    echo "down: no dashboard on $dashboard"
    return 3
  fi
  echo "up: $(nodes_alive) nodes alive, dashboard and job server on $dashboard"
  "$RAY" status --address="127.0.0.1:$GCS_PORT"
}

down() {
  # This cluster's nodes only (cluster/stop.py); `ray stop` would end every Ray of the user's.
  local python
  python=$(dirname "$RAY")/python
  [ -x "$python" ] || python=python3
  "$python" "$root/cluster/stop.py" "$GCS_PORT"
  echo "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
