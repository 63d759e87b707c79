#!/usr/bin/env bash
# A worker node on any provider: rented, preemptible. Its labels are what elastictrain places,
# spreads, groups and reports by (ScalingConfig.label_selector / spread_by / group_by, manifests'
# provenance, `elastictrain report`). Set them from what the machine is; the examples below are
# what each provider's own metadata calls them.
#
#   HEAD=10.8.0.1 PROVIDER=gcp REGION=europe-west4 ZONE=europe-west4-a \
#     INSTANCE_TYPE=a3-highgpu-8g ACCELERATOR=H100 ./start-worker.sh
#
#   aws:   REGION=us-east-1      ZONE=us-east-1a       INSTANCE_TYPE=p5.48xlarge     ACCELERATOR=H100
#   gcp:   REGION=europe-west4   ZONE=europe-west4-a   INSTANCE_TYPE=a3-highgpu-8g   ACCELERATOR=H100
#   azure: REGION=westeurope     ZONE=westeurope-1     INSTANCE_TYPE=Standard_ND96isr_H100_v5 ACCELERATOR=H100
#   any other supplier (a GPU cloud, a colo): PROVIDER=<its name>, the rest as it names them.
set -euo pipefail

: "${HEAD:?the head node's overlay address}" "${PROVIDER:?aws, gcp, azure or the supplier's name}"
: "${REGION:?}" "${ZONE:=${REGION}}" "${INSTANCE_TYPE:=unknown}" "${ACCELERATOR:=none}"
: "${MARKET:=spot}" "${OVERLAY_IF:=wg0}"

ADDRESS=$(ip -4 -o addr show "$OVERLAY_IF" | awk '{print $4}' | cut -d/ -f1)
# Ray's own scheduler reads these too: ray.io/availability-zone, ray.io/availability-region and
# ray.io/market-type come from the environment variables below (Ray sets them on KubeRay pods).
export RAY_NODE_ZONE="$ZONE" RAY_NODE_REGION="$REGION" RAY_NODE_MARKET_TYPE="$MARKET"

ray start --address="${HEAD}:6379" \
  --node-ip-address="$ADDRESS" \
  --labels="provider=${PROVIDER},region=${REGION},zone=${ZONE},instance_type=${INSTANCE_TYPE},accelerator=${ACCELERATOR},market=${MARKET}"
