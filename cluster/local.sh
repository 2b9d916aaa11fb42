#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head node and worker node(s), each a
# `ray start` with its own CPUs, a custom resource and a capped object store; the dashboard
# and job server on 127.0.0.1:8265.
#
#   cluster/local.sh up        # then: RAY_ADDRESS=http://127.0.0.1:8265 ray job submit ...
#   cluster/local.sh status
#   cluster/local.sh down
#
# Settings (environment): WORKERS (1), HEAD_CPUS (1), WORKER_CPUS (2), OBJECT_STORE_BYTES
# (300 MB per node), GCS_PORT (6380), DASHBOARD_PORT (8265), RAY_TMPDIR (/tmp), RAY (the `ray` to use: the
# project's .venv when present, so jobs' `python` is the one with mmray installed).
#
# Authentication: Ray 2.60 enables token auth, and `ray job submit` then needs
# RAY_AUTH_MODE=token in every shell. This cluster is a loopback-only development cluster
# (every node on 127.0.0.1, dashboard on 127.0.0.1), so it runs with RAY_AUTH_MODE=disabled
# and the plain commands just work. A shared or remote cluster should keep token auth.
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
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Idle worker processes stay 10 minutes (Ray's default past num_cpus: 1 s), so a job's
# datasets and evaluations reuse them instead of starting new ones (pipelines/job.py).
export RAY_idle_worker_killing_time_threshold_ms=${RAY_idle_worker_killing_time_threshold_ms:-600000}
dashboard=http://127.0.0.1:$DASHBOARD_PORT

nodes_alive() {
  curl -sf "$dashboard/nodes?view=summary" 2>/dev/null |
    python3 -c 'import json, sys; print(sum(n["raylet"]["state"] == "ALIVE" for n in json.load(sys.stdin)["data"]["summary"]))' 2>/dev/null ||
    echo 0
}

up() {
  if curl -sf "$dashboard/api/version" >/dev/null 2>&1; then
    echo "a Ray dashboard already answers on $dashboard: run '$0 down' first" >&2
    exit 1
  fi
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
  echo "  RAY_ADDRESS=$dashboard ray job submit --working-dir . -- python -m pipelines.curate ..."
}

status() {
  if ! curl -sf "$dashboard/api/version" >/dev/null 2>&1; then
    echo "down: no dashboard on $dashboard"
    return 3
  fi
  echo "up: $(nodes_alive) nodes alive, dashboard and job server on $dashboard"
  "$RAY" status --address="127.0.0.1:$GCS_PORT"
}

down() {
  # `ray stop` ends the Ray processes of this machine's user: every node of this cluster.
  "$RAY" stop --force >/dev/null 2>&1 || true
  echo "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
