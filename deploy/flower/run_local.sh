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
export PATH="$BIN:$PATH"  # the SuperLink and SuperNodes start flower-superexec and the apps from PATH
export FLWR_HOME="$OUT/.flwr"
mkdir -p "$FLWR_HOME"

# the config is checked (one line on error) before anything starts
SITES=$("$PYTHON" -c 'import sys
from medlora.federated.config import load_federated_config
print(" ".join(s.name for s in load_federated_config(sys.argv[1]).sites))' "$CONFIG")

PIDS=()
cleanup() {
  # the SuperLink and SuperNodes stop their SuperExec; the ServerApp/ClientApp processes Flower detached are
  # this deployment's own (their runtime API is on our ports), stopped by process id if still there
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  sleep 2
  ps -eo pid=,args= | while read -r pid args; do
    for p in $(seq "$PORT" $((PORT + ${#PIDS[@]}))); do
      case "$args" in *"-api-address 127.0.0.1:$p "*) kill "$pid" 2>/dev/null || true ;; esac
    done
  done
}
trap cleanup EXIT
trap 'exit 143' INT TERM

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

# wait until the SuperLink answers (importing torch and Flower takes a while on a loaded machine)
"$PYTHON" -c 'import socket, sys, time
deadline = time.monotonic() + 180
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the SuperLink did not start within 180 s: see " + sys.argv[2])
        time.sleep(0.5)' "$PORT" "$FLWR_HOME/superlink.log"

cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "medlora-local"

[superlink.medlora-local]
address = "127.0.0.1:$PORT"
insecure = true
TOML

"$BIN/flwr" run "$APP" medlora-local --stream \
  --run-config "config=\"$CONFIG\" out=\"$OUT\" strategy=\"$STRATEGY\""
