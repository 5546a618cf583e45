#!/usr/bin/env bash
# A multi-node Ray cluster on this host: a head node and N worker nodes, each a separate
# `ray start` on 127.0.0.1 with its own CPUs and its own Ray temp dir, token authentication on,
# the dashboard (Jobs API) on 127.0.0.1:8265 and one storage directory that every node (and so
# every job) uses for run directories and Ray Train/Tune checkpoints.
#
#   cluster/local/up.sh [N]        # N worker nodes (default: $RAYFINE_WORKERS, else 1)
#   rayfine submit resnet18_digits_tiny --job train --address http://127.0.0.1:8265 --follow
#   cluster/local/down.sh          # stops exactly what this started
#
# Settings (environment):
#   RAYFINE_CLUSTER_DIR   state dir: node temp dirs, logs, pids, storage (default /tmp/rayfine-cluster;
#                         keep it short: Ray's socket paths live below it)
#   RAYFINE_HEAD_CPUS     CPUs of the head node (default 1)      RAYFINE_WORKER_CPUS  per worker (default 1)
#   RAYFINE_GCS_PORT      head's GCS port (default 6379)         RAYFINE_DASHBOARD_PORT  (default 8265)
#   RAYFINE_CLIENT_PORT   Ray Client server (default 10001)
#   RAYFINE_OBJECT_STORE_MB  object store per node (default 400)
#   RAYFINE_VENV          the Python environment with rayfine (default: <repo>/.venv)
# The token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (created
# with `ray get-auth-token --generate`, mode 600, when none exists; a token file readable by others is
# made mode 600). Clients on this host find it there.
# Run it under the project's Ray lock when tests or other Ray runs share the machine:
#   flock /tmp/rayfine-ray.lock cluster/local/up.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
workers="${1:-${RAYFINE_WORKERS:-1}}"
state="${RAYFINE_CLUSTER_DIR:-/tmp/rayfine-cluster}"
venv="${RAYFINE_VENV:-$repo/.venv}"
head_cpus="${RAYFINE_HEAD_CPUS:-1}"
worker_cpus="${RAYFINE_WORKER_CPUS:-1}"
gcs_port="${RAYFINE_GCS_PORT:-6379}"
dash_port="${RAYFINE_DASHBOARD_PORT:-8265}"
client_port="${RAYFINE_CLIENT_PORT:-10001}"
store_bytes=$(( ${RAYFINE_OBJECT_STORE_MB:-400} * 1024 * 1024 ))

die() { echo "up.sh: $*" >&2; exit 1; }
[[ "$workers" =~ ^[0-9]+$ ]] || die "the number of worker nodes must be a whole number, got '$workers'"
[[ -x "$venv/bin/ray" ]] || die "no Ray in $venv (run \`make setup\`, or set RAYFINE_VENV)"
# The state dir holds cluster.env (which users source) and the sessions down.sh ends: only this account
# may own and write it (another account could have made a predictable /tmp path first).
state="${state%/}"; state="${state:-/}"  # "dir/" would test the target of a link "dir"
[[ -L "$state" ]] && die "RAYFINE_CLUSTER_DIR=$state is a symbolic link: give a directory of your own"
[[ -e "$state" ]] || mkdir -p -m 700 "$state" || die "cannot create $state"
[[ -d "$state" && -O "$state" ]] || die "$state is not a directory of this account: remove it, or set RAYFINE_CLUSTER_DIR"
[[ -z "$(find "$state" -maxdepth 0 -perm /022)" ]] \
  || die "$state is writable by other accounts: \`chmod go-w $state\`, or set RAYFINE_CLUSTER_DIR"
state="$(cd "$state" && pwd)"
# Ray's Unix sockets live at <temp dir>/session_<date>_<pid>/sockets/..., and a socket path is limited to 107 bytes.
(( ${#state} <= 40 )) || die "RAYFINE_CLUSTER_DIR=$state is too long for Ray's socket paths: use at most 40 characters"
if compgen -G "$state/nodes/*.sid" >/dev/null; then
  if ps -eo sid= | awk -v sids="$(cat "$state"/nodes/*.sid | tr '\n' ' ')" \
      'BEGIN { split(sids, s, " "); for (i in s) want[s[i]] = 1 } ($1 in want) { found = 1 } END { exit !found }'; then
    die "the cluster recorded in $state is still running: stop it with cluster/local/down.sh first"
  fi
  rm -f "$state"/nodes/*.sid  # left by a cluster that is gone
fi
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$gcs_port" "$dash_port" "$client_port"; do
  port_busy "$port" && die "port $port on 127.0.0.1 is in use (another Ray?): set RAYFINE_GCS_PORT / RAYFINE_DASHBOARD_PORT / RAYFINE_CLIENT_PORT"
done

# Job entrypoints and workers inherit the environment of `ray start`: the venv first on PATH (else
# `python` in an entrypoint is the system one), token auth, and the shared storage for run dirs.
export PATH="$venv/bin:$PATH"
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
# No metrics exporter in each node's dashboard agent: it answers anyone, with no token, on every
# interface (as the rayfine commands' embedded Ray leaves it out). A value set by the caller wins.
export RAY_enable_metrics_collection="${RAY_enable_metrics_collection:-0}"
# Ray code in workers that asks the State API without an address (Ray Train's placement-group cleaner,
# every second) takes RAY_API_SERVER_ADDRESS, else the cluster named in /tmp/ray/ray_current_cluster
# (RAY_TMPDIR/ray), which these nodes, each with its own --temp-dir, do not write, else the one GCS
# process on the host. So with a plain `ray start` on the host the cleaner asked that cluster, took the
# controller for dead and quit at once (the job's log: "Failed to register placement group with
# cleaner"); with any other Ray it failed ("Found multiple active Ray instances") and stayed alive for
# good, watching nothing. So every process of this cluster is told its own address.
dashboard="http://127.0.0.1:$dash_port"
export RAY_API_SERVER_ADDRESS="$dashboard"
# A marker that every process of this cluster inherits and nothing else has: down.sh finds by it
# what escaped the nodes' sessions (a random value, never in cluster.env, so no shell exports it).
marker="$(date +%s%N)-$$-$RANDOM$RANDOM"
echo "$marker" >"$state/cluster.id"
export RAYFINE_LOCAL_CLUSTER_ID="$marker"
storage="$state/storage"
export RAYFINE_RUNS_DIR="$storage"
mkdir -p "$storage" "$state/nodes"
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  token_from="RAY_AUTH_TOKEN"
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
  token_from="$RAY_AUTH_TOKEN_PATH"
else
  token_from="$HOME/.ray/auth_token"
  # Ray writes a new token (and ~/.ray) under the umask, world-readable by default: only this account
  # may read it, as whoever holds it can run code on the cluster.
  [[ -s "$token_from" ]] || (umask 077 && ray get-auth-token --generate >/dev/null 2>&1) \
    || die "could not create $token_from"
fi
if [[ "$token_from" != RAY_AUTH_TOKEN ]] && [[ -n "$(find "$token_from" -perm /077 2>/dev/null)" ]]; then
  chmod 600 "$token_from" 2>/dev/null \
    || echo "up.sh: warning: $token_from is readable by other accounts and cannot be chmod 600: restrict it" >&2
fi

# One node: `ray start` in a new session (setsid), whose id is recorded, so that down.sh finds every
# process of this node (and nothing else) by session; the node's own processes are listed too.
# (Ray 2.60's `ray start` swaps a loopback --node-ip-address for the host's own address, which the
# nodes then advertise; the traffic stays on this host, and the dashboard binds 127.0.0.1.)
start_node() {  # name, then `ray start` arguments
  local name="$1"; shift
  local log="$state/nodes/$name.log"
  if ! setsid -w bash -c 'echo $$ > "$0"; exec "${@}"' "$state/nodes/$name.sid" \
      ray start --node-ip-address=127.0.0.1 --temp-dir="$state/$name" --object-store-memory="$store_bytes" \
      --min-worker-port=0 --max-worker-port=0 --disable-usage-stats "$@" >"$log" 2>&1 </dev/null; then
    tail -n 20 "$log" >&2
    die "the $name node did not start (log: $log); stop what did start with cluster/local/down.sh"
  fi
  ps -eo pid=,sid= | awk -v s="$(cat "$state/nodes/$name.sid")" '$2 == s {print $1}' >"$state/nodes/$name.pids"
}

start_node head --head --port="$gcs_port" --num-cpus="$head_cpus" --dashboard-host=127.0.0.1 \
  --dashboard-port="$dash_port" --ray-client-server-port="$client_port" --resources='{"rayfine_head": 1}'
for ((i = 1; i <= workers; i++)); do
  start_node "worker$i" --address="127.0.0.1:$gcs_port" --num-cpus="$worker_cpus" \
    --dashboard-agent-listen-port=0 --resources="{\"rayfine_worker$i\": 1}"
done

# Wait (with a deadline) until the dashboard answers and every node is alive in Ray's state API.
python - "$dashboard" $((workers + 1)) <<'EOF' || die "the cluster did not come up (logs: $state/nodes/*.log)"
import sys, time
from ray.util.state import list_nodes
address, want = sys.argv[1], int(sys.argv[2])
deadline, alive = time.monotonic() + 90, 0
while time.monotonic() < deadline:
    try:
        alive = sum(n.state == "ALIVE" for n in list_nodes(address=address, raise_on_missing_output=False))
        if alive >= want:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
print(f"up.sh: {alive} of {want} nodes alive after 90 s", file=sys.stderr)
sys.exit(1)
EOF

cat >"$state/cluster.env" <<EOF
# source this file to talk to the local cluster (written by cluster/local/up.sh)
export RAY_ADDRESS=127.0.0.1:$gcs_port
export RAY_API_SERVER_ADDRESS=$dashboard
export RAY_AUTH_MODE=token
export RAYFINE_RUNS_DIR=$storage
EOF
cat <<EOF
Ray cluster up: head + $workers worker node(s) on 127.0.0.1 ($head_cpus + $workers x $worker_cpus CPUs), token auth on
  dashboard / Jobs API: $dashboard          (GCS: 127.0.0.1:$gcs_port)
  shared storage:       $storage   (RAYFINE_RUNS_DIR of every job)
  auth token:           $token_from
  state, logs, pids:    $state
Submit a job:
  rayfine submit resnet18_digits_tiny --job train --address $dashboard --follow
  rayfine jobs list --address $dashboard
or: source $state/cluster.env, then leave out --address (and \`ray status\` works too).
Stop exactly this cluster: cluster/local/down.sh   (RAYFINE_CLUSTER_DIR=$state)
EOF
