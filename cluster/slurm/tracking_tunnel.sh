# Sourced by the batch scripts. Rank 0 logs to MLflow from the first node of the job, where 127.0.0.1 is that node:
# with EBWM_MLFLOW_TUNNEL=HOST[:PORT] an ssh tunnel makes http://127.0.0.1:PORT here reach the server on HOST
# (started there with cluster/mlflow_server.sh, bound to 127.0.0.1), so tracking.uri=http://127.0.0.1:PORT works.
if [ -n "${EBWM_MLFLOW_TUNNEL:-}" ]; then
  tunnel_host=${EBWM_MLFLOW_TUNNEL%%:*}
  tunnel_port=${EBWM_MLFLOW_TUNNEL#"$tunnel_host"}
  tunnel_port=${tunnel_port#:}
  tunnel_port=${tunnel_port:-5000}
  ssh -N -o BatchMode=yes -o ExitOnForwardFailure=yes -L "$tunnel_port:127.0.0.1:$tunnel_port" "$tunnel_host" &
  echo "MLflow: tunnel 127.0.0.1:$tunnel_port -> $tunnel_host:$tunnel_port (ssh pid $!)"
fi
