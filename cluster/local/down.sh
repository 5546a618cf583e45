#!/usr/bin/env bash
# Stop the local cluster that cluster/local/up.sh started from the same state dir, and nothing else.
#
#   cluster/local/down.sh                      # RAYFINE_CLUSTER_DIR, default /tmp/rayfine-cluster
#   RAYFINE_STOP_GRACE_S=20 cluster/local/down.sh
#
# `ray stop` cannot do this: it ends every Ray process of the machine, by name. Instead each node
# was started in its own session (setsid) whose id up.sh recorded; this stops the processes of
# those sessions and their descendants (Ray runs a job's entrypoint in a session of its own) and
# any process carrying this cluster's marker variable. SIGTERM first, as `ray stop` does, then
# SIGKILL after the grace period. Exits 1 if anything survived.
set -euo pipefail

state="${RAYFINE_CLUSTER_DIR:-/tmp/rayfine-cluster}"
grace="${RAYFINE_STOP_GRACE_S:-10}"
die() { echo "down.sh: $*" >&2; exit 1; }
state="${state%/}"; state="${state:-/}"  # "dir/" would test the target of a link "dir"
# The sessions it records are ended: only a state dir this account owns, and no other can write, counts.
[[ -L "$state" ]] && die "$state is a symbolic link: set RAYFINE_CLUSTER_DIR to the directory up.sh used itself"
[[ -d "$state" ]] || die "no cluster state in $state (set RAYFINE_CLUSTER_DIR to the dir up.sh used)"
[[ -O "$state" ]] || die "$state belongs to another account: not a cluster this account started"
[[ -z "$(find "$state" -maxdepth 0 -perm /022)" ]] \
  || die "$state is writable by other accounts, who could have changed the sessions it records: check" \
         "$state/nodes/*.sid, then \`chmod go-w $state\` and run down.sh again"
state="$(cd "$state" && pwd)"
shopt -s nullglob
sid_files=("$state"/nodes/*.sid)
if ((${#sid_files[@]} == 0)); then
  echo "down.sh: no running cluster recorded in $state"
  exit 0
fi
sids="$(cat "${sid_files[@]}" | tr '\n' ' ')"
marker="$(cat "$state/cluster.id" 2>/dev/null || true)"

# The processes of this cluster now: members of the recorded sessions, processes that carry this
# cluster's marker variable (up.sh exports a random RAYFINE_LOCAL_CLUSTER_ID; every Ray process of the cluster,
# job entrypoints included, inherits it), and all their descendants. A session id stays reserved
# by the kernel while any member lives, so a member of these sessions is always one of ours.
ours() {
  local marked
  marked=""
  if [[ -n "$marker" ]]; then
    marked="$(grep -lzxF "RAYFINE_LOCAL_CLUSTER_ID=$marker" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | tr '\n' ' ')" || true
  fi
  ps -eo pid=,ppid=,sid=,stat= | awk -v sids="$sids" -v marked="$marked" -v me="$$" '
    BEGIN {
      n = split(sids, s, " "); for (i = 1; i <= n; i++) want[s[i]] = 1
      n = split(marked, m, " "); for (i = 1; i <= n; i++) mark[m[i]] = 1
    }
    { parent[$1] = $2; zombie[$1] = ($4 ~ /^Z/); if ($3 in want) mark[$1] = 1 }
    END {
      do {  # add the descendants of marked processes until nothing changes
        changed = 0
        for (pid in parent) if (!(pid in mark) && (parent[pid] in mark)) { mark[pid] = 1; changed = 1 }
      } while (changed)
      for (pid in mark) if (pid != me && (pid in parent) && !zombie[pid]) print pid
    }'
}

# SIGTERM, wait up to the grace period, SIGKILL what is left, wait until it is gone.
stop() {  # pids
  local left deadline
  [[ -n "${*// /}" ]] || return 0
  kill -TERM "$@" 2>/dev/null || true
  deadline=$((SECONDS + grace))
  while left="$(alive "$@")" && [[ -n "$left" ]] && ((SECONDS < deadline)); do sleep 0.3; done
  if [[ -n "$left" ]]; then
    echo "down.sh: still running after ${grace}s, SIGKILL:" $(ps -o comm= -p "$(echo $left | tr ' ' ',')" 2>/dev/null)
    kill -KILL $left 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [[ -n "$(alive $left)" ]] && ((SECONDS < deadline)); do sleep 0.2; done
  fi
}
# The given pids that still run (a zombie has ended: only its parent's wait() is missing).
alive() {
  local pid stat
  for pid in "$@"; do
    read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]] && echo -n "$pid "
  done
  true
}

head_sid="$(cat "$state/nodes/head.sid" 2>/dev/null || echo none)"
all="$(ours | tr '\n' ' ')"
echo "down.sh: stopping $(wc -w <<<"$all") process(es) of the cluster in $state"
# Worker nodes and jobs first, then the head's processes, the GCS last: a raylet deregisters from
# the GCS when it stops and would wait for one that is gone.
not_head="$(ps -o pid=,sid= -p "$(echo $all | tr ' ' ',')" 2>/dev/null | awk -v h="$head_sid" '$2 != h {print $1}' | tr '\n' ' ')" || true
stop $not_head
last="$(ours | tr '\n' ' ')"
stop $(ps -o pid=,comm= -p "$(echo $last | tr ' ' ',')" 2>/dev/null | awk '$2 != "gcs_server" {print $1}')
stop $(ours | tr '\n' ' ')

recorded="$(cat "$state"/nodes/*.pids 2>/dev/null | tr '\n' ' ')"
left="$(ours | tr '\n' ' ')$(alive $recorded)"
if [[ -n "${left// /}" ]]; then
  ps -o pid=,stat=,args= -p "$(echo $left | tr ' ' ',')" >&2 || true
  die "these processes of the cluster are still running: $left"
fi
rm -f "$state"/nodes/*.sid "$state/cluster.env" "$state/cluster.id"
echo "down.sh: cluster in $state stopped (logs kept in $state/nodes, storage in $state/storage)"
