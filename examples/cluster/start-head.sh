#!/usr/bin/env bash
# The head node: on stable (on-demand) capacity, never on a spot machine. It runs Ray's control
# plane (GCS), the dashboard's job API and every run's driver (`ray job submit` starts drivers
# here), so it gets no CPUs or GPUs for workers: training goes only to the labelled worker nodes.
#
#   REDIS_ADDRESS=redis.internal:6379 REDIS_PASSWORD=... ./start-head.sh
#
# With REDIS_ADDRESS set, Ray's GCS fault tolerance keeps the cluster's tables and key-value store
# (elastictrain's election records among them) in that external Redis, so a restarted head finds
# its worker nodes again instead of a new, empty cluster. Without it a head restart is a new cluster.
set -euo pipefail

: "${PROVIDER:=aws}" "${REGION:=us-east-1}" "${ZONE:=us-east-1a}"
: "${OVERLAY_IF:=wg0}"   # the private overlay (WireGuard/Tailscale) every node of every provider joins

ADDRESS=$(ip -4 -o addr show "$OVERLAY_IF" | awk '{print $4}' | cut -d/ -f1)
if [[ -n "${REDIS_ADDRESS:-}" ]]; then
  export RAY_REDIS_ADDRESS="$REDIS_ADDRESS"
  export RAY_external_storage_namespace="${RAY_CLUSTER_NAME:-elastictrain}"
fi
# Token authentication (the default since Ray 2.60): generate the token once, copy it to every node
# (~/.ray/auth_token) and to wherever `ray job submit` runs, with RAY_AUTH_MODE=token set there.
ray get-auth-token --generate >/dev/null 2>&1 || true

ray start --head \
  --node-ip-address="$ADDRESS" \
  --port=6379 \
  --dashboard-host="$ADDRESS" \
  --num-cpus=0 --num-gpus=0 \
  ${REDIS_PASSWORD:+--redis-password="$REDIS_PASSWORD"} \
  --labels="provider=${PROVIDER},region=${REGION},zone=${ZONE},role=head"
