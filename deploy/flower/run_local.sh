#!/usr/bin/env bash
# A 1-server / N-site deployment of a federation on localhost with Flower's deployment engine (flwr 1.42):
# one SuperLink, one SuperNode per site of the config (--node-config site="<name>"), then `flwr run` of the app
# in this folder (pyproject.toml), streaming its log until the run ends; every process is stopped on exit.
#   deploy/flower/run_local.sh configs/federated/sah_sites.yaml runs/sah_sites_deployed [STRATEGY]
# Environment: PYTHON (default: python on PATH, with medlora[federated] installed), PORT (the SuperLink's
# HTTP port, default 9100; the SuperNodes take the next ones). Flower's state and logs go to OUT/.flwr.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG OUT [STRATEGY]" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
BIN=$(dirname "$(command -v "$PYTHON")")
CONFIG=$(realpath "$1")
OUT=$(realpath -m "$2")
STRATEGY=${3:-}
PORT=${PORT:-9100}
APP=$(dirname "$(realpath "$0")")
export FLWR_HOME="$OUT/.flwr"
mkdir -p "$FLWR_HOME"

# the config is checked (one line on error) before anything starts
SITES=$("$PYTHON" -c 'import sys
from medlora.federated.config import load_federated_config
print(" ".join(s.name for s in load_federated_config(sys.argv[1]).sites))' "$CONFIG")

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/flower-superlink" --insecure --host 127.0.0.1 --port "$PORT" --disable-runtime-dependency-installation \
  >"$FLWR_HOME/superlink.log" 2>&1 &
PIDS+=($!)
i=0
for site in $SITES; do
  i=$((i + 1))
  "$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$PORT" --port $((PORT + i)) \
    --node-config "site=\"$site\"" >"$FLWR_HOME/supernode-$site.log" 2>&1 &
  PIDS+=($!)
done

cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "medlora-local"

[superlink.medlora-local]
address = "127.0.0.1:$PORT"
insecure = true
TOML

"$BIN/flwr" run "$APP" medlora-local --stream \
  --run-config "config=\"$CONFIG\" out=\"$OUT\" strategy=\"$STRATEGY\""
