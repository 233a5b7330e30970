#!/usr/bin/env bash
# An MLflow tracking server for ebwm-scale runs: sqlite backend, artifacts proxied by the server (clients on
# other nodes need no shared filesystem). Point runs at it with tracking.uri=http://HOST:PORT.
#
#   cluster/mlflow_server.sh [STORE_DIR=mlflow-server] [PORT=5000] [HOST=127.0.0.1]
#
# HOST=0.0.0.0 serves the cluster (then put it behind your site's access control). Stop it with SIGTERM/Ctrl-C.
set -euo pipefail
store=$(realpath -m "${1:-mlflow-server}")
port=${2:-5000}
host=${3:-127.0.0.1}
mkdir -p "$store/artifacts"
echo "mlflow server on http://$host:$port (store $store)"
exec mlflow server \
  --host "$host" --port "$port" \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" \
  --workers 1
