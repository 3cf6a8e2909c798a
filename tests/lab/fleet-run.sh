#!/usr/bin/env bash
# The fleet lab demo (`make lab-fleet`): two servicegate gateways announce the Service VIPs of
# configs/fleet/services/ over BGP (one BIRD each) to an upstream router namespace (BIRD, ECMP);
# clients from many addresses behind the router reach the pods of `make lab` through both.
# Shows the announcements (servicegate and BIRD), the router's ECMP route, which gateway and
# pod answered, a SIGTERM drain of gateway 1 and its return. Tears everything down at the end
# and on Ctrl-C. Topology: tests/lab/fleet.sh.
#   tests/lab/fleet-run.sh      (as root, after cargo build --release; `make lab-fleet` builds)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${SERVICEGATE_BIN:-$root/target/release/servicegate}
prefix=sgf
work=$(mktemp -d /tmp/servicegate-fleet.XXXXXX)
export FLEET_DIR=$work/bird
admins=(127.0.0.1:9911 127.0.0.1:9912)
pids=("" "")
started=$(date +%s.%N)

cleanup() {
  set +e
  for g in 0 1; do
    if [ -n "${pids[$g]}" ] && kill -0 "${pids[$g]}" 2>/dev/null; then
      kill -INT "${pids[$g]}"; wait "${pids[$g]}" 2>/dev/null
    fi
  done
  bash "$root/tests/lab/fleet.sh" down "$prefix"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ns() { ip netns exec "$prefix-$1" "${@:2}"; }
client() { ns clients python3 "$root/tests/lab/client.py" "$@"; }
birdc_() { birdc -s "$FLEET_DIR/$1.ctl" "${@:2}"; }
inserts() {
  curl -s "http://${admins[$1]}/metrics" | awk '/^servicegate_conntrack_inserts_total/ {s += $NF} END {print s + 0}'
}
# start G: runs gateway G+1 and waits until its ports are started (the taps exist).
start() {
  local g=$1
  "$bin" run --config "$work/gw$((g + 1)).yaml" > "$work/gw$((g + 1)).out" 2> "$work/gw$((g + 1)).log" &
  pids[$g]=$!
  for _ in $(seq 1 300); do
    curl -sf "http://${admins[$g]}/healthz" >/dev/null && return 0
    kill -0 "${pids[$g]}" 2>/dev/null || { cat "$work/gw$((g + 1)).log" >&2; exit 1; }
    sleep 0.1
  done
  echo "gateway $((g + 1)) did not start" >&2; exit 1
}
# announced G yes|no: waits until the router's route to the VIP has (or lacks) gateway G+1.
announced() {
  local hop=192.168.10$(($1 + 1)).1
  for _ in $(seq 1 1500); do
    if ip -n "$prefix-router" route show 192.0.2.100 | grep -q "via $hop "; then
      [ "$2" = yes ] && return 0
    else
      [ "$2" = no ] && return 0
    fi
    sleep 0.02
  done
  echo "gateway $(($1 + 1)) announced: not $2 after 30 s" >&2; exit 1
}
ms_since() { python3 -c "import time; print(round((time.time() - $1) * 1000))"; }

[ -x "$bin" ] || { echo "no $bin: run 'cargo build --release' (make lab-fleet does)" >&2; exit 1; }
command -v bird >/dev/null || { echo "no bird: apt-get install bird2 (make lab-fleet does)" >&2; exit 1; }
for g in 1 2; do
  sed -e "s#path: services#path: $root/configs/fleet/services#" "$root/configs/fleet/gw$g.yaml" > "$work/gw$g.yaml"
done

say "servicegate check (gateway 1; gateway 2 differs in addresses and names only)"
"$bin" check --config "$work/gw1.yaml"

say "starting two servicegate gateways, the router, the clients and the cluster"
start 0
start 1
bash "$root/tests/lab/fleet.sh" up "$prefix"
announced 0 yes
announced 1 yes

say "servicegate ctl announcements (gateway 1)"
"$bin" ctl --admin "${admins[0]}" announcements
say "gateway 1's kernel table 100 (servicegate's routes) and what its BIRD learned"
ip -n "$prefix-gw1" route show table 100
birdc_ gw1 show route table announced
say "the router: BGP sessions, BFD, and the ECMP route BIRD installed"
birdc_ router show protocols
birdc_ router show bfd sessions
ip -n "$prefix-router" route show 192.0.2.0/24

say "300 new connections to 192.0.2.100:80 from 254 client addresses: pods, and share per gateway"
before=("$(inserts 0)" "$(inserts 1)")
client spread http://192.0.2.100/ 300 198.51.100.0/24
d1=$(( $(inserts 0) - before[0] )); d2=$(( $(inserts 1) - before[1] ))
echo "    gw1 carried $d1, gw2 carried $d2"

say "the same 5-tuples through each gateway alone (policy rule on the router) reach the same pods"
for g in 1 2; do
  ip -n "$prefix-router" route replace 192.0.2.100 via 192.168.10$g.1 table 201
  ip -n "$prefix-router" rule add iif clients lookup 201 pref 100
  echo "    via gw$g: $(client tuples http://192.0.2.100/ 12 198.51.100.0/24 12 21000)"
  ip -n "$prefix-router" rule del pref 100
done

say "SIGTERM gateway 1 under 50 new connections/s: withdraw, drain, exit"
client load http://192.0.2.100/ 50 198.51.100.0/24 "$work/load.json" >/dev/null &
load=$!
sleep 1
sent=$(date +%s.%N)
kill -TERM "${pids[0]}"
announced 0 no
echo "    the router dropped gw1 after $(ms_since "$sent") ms:"
ip -n "$prefix-router" route show 192.0.2.100 | sed 's/^/    /'
wait "${pids[0]}" || true
echo "    gw1 exited after $(ms_since "$sent") ms"
restarted=$(date +%s.%N)
start 0
bash "$root/tests/lab/fleet.sh" attach "$prefix" 1
announced 0 yes
echo "    gw1 restarted, in the router's FIB again after $(ms_since "$restarted") ms"
sleep 1
kill -TERM "$load"; wait "$load" || true
python3 -c "
import json; r = json.load(open('$work/load.json'))
print('    new connections during the drain and restart: %d, failed %d, slower than 0.5 s %d' % (r['total'], r['failed'], r['slow']))"

say "kill -9 of gateway 2: the router drops it when BFD times out"
sent=$(date +%s.%N)
kill -9 "${pids[1]}"
announced 1 no
echo "    the router dropped gw2 after $(ms_since "$sent") ms (BFD 3 x 100 ms)"
client spread http://192.0.2.100/ 50 198.51.100.0/24

ended=$(date +%s.%N)
say "fleet lab done in $(python3 -c "print(round($ended - $started, 1))") s; tearing down"
