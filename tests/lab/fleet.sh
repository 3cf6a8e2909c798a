#!/usr/bin/env bash
# The fleet lab: two servicegate gateways behind an upstream router that learns the Service
# VIPs from both over BGP (BIRD 2) and spreads connections over them with ECMP.
#
#   clients ns (198.51.100.0/24, AnyIP) ── router ns (BIRD, ECMP, fib_multipath_hash_policy=1)
#                                             │ 192.168.101.2         │ 192.168.102.2
#                                      fabric ns: bridge br1       bridge br2   (the "switch")
#                                             │ tap PREFIX1u           │ tap PREFIX2u
#                                         servicegate gw1          servicegate gw2
#            exception tap PREFIX1k ──┘  │ PREFIX1c        │ PREFIX2c └── exception tap PREFIX2k
#    gw1 ns: kernel 192.168.101.1, BIRD  │                 │  gw2 ns: kernel 192.168.102.1, BIRD
#                                  underlay ns: bridge br0 10.0.0.0/24
#                   gw1 10.0.0.1 · gw2 10.0.0.2 · node1 10.0.0.11 · node2 10.0.0.12 (VXLAN vni 42)
#                   node1: pod1 10.244.1.2, pod2 10.244.1.3 · node2: pod3 10.244.2.2
#
# The uplink taps hang off a bridge (not the router's own interface) so that a dead gateway
# does not take the router's interface down: the router learns of it through BFD/BGP, as a
# real router would. Each gateway's exception tap lives in its own kernel namespace with the
# gateway's uplink address and MAC, where its BIRD peers with the router (BGP over the
# exception path) and learns servicegate's routes from kernel table 100.
#
# Usage (as root; the gateways must be running, with their ports started, before `up` and
# `attach`, since net_tap creates the taps in the root namespace):
#   fleet.sh up PREFIX         builds everything, wires both gateways' taps, starts the BIRDs
#   fleet.sh attach PREFIX N   wires gateway N's taps again after a restart (starts its BIRD
#                              if it is not running)
#   fleet.sh down PREFIX       removes everything
# Taps are named PREFIX1u/1c/1k and PREFIX2u/2c/2k (PREFIX at most 12 characters), namespaces
# PREFIX-router, PREFIX-clients, PREFIX-gw1, ... BIRD's files are in $FLEET_DIR
# (default /tmp/PREFIX-fleet): router.ctl, gw1.ctl, gw2.ctl (birdc -s), *.conf, *.log.
set -euo pipefail
action=${1:-} prefix=${2:-}
[ -n "$prefix" ] || { echo "usage: $0 up|attach|down PREFIX [N]" >&2; exit 2; }
[ ${#prefix} -le 12 ] || { echo "PREFIX $prefix: at most 12 characters (tap names)" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${FLEET_DIR:-/tmp/$prefix-fleet}

# MACs the gateway configs (configs/fleet/gw*.yaml) name, and the nodes' VXLAN devices.
UPLINK_MAC=([1]=02:53:47:00:00:01 [2]=02:53:47:00:00:11)
CLUSTER_MAC=([1]=02:53:47:00:00:02 [2]=02:53:47:00:00:12)
NODE1_VTEP_MAC=02:53:47:00:01:01
NODE2_VTEP_MAC=02:53:47:00:01:02
CLIENTS_NET=198.51.100.0/24

ns() { ip netns exec "$prefix-$1" "${@:2}"; }
have_ns() { ip netns list | grep -qw "$1"; }

down() {
  for n in clients router fabric gw1 gw2 underlay node1 node2 pod1 pod2 pod3; do
    if have_ns "$prefix-$n"; then
      for pid in $(ip netns pids "$prefix-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$prefix-$n" 2>/dev/null || true
    fi
  done
  rm -rf "$dir"
}

wait_link() {
  for _ in $(seq 1 200); do [ -e "/sys/class/net/$1" ] && return 0; sleep 0.05; done
  echo "interface $1 did not appear (is gateway servicegate running?)" >&2; return 1
}

newns() {
  ip netns add "$prefix-$1"
  ns "$1" ip link set lo up
}

# veth A_NS A_IF B_NS B_IF: a pair created directly in its two namespaces (no root-ns names).
veth() {
  ip link add "$2" netns "$prefix-$1" type veth peer name "$4" netns "$prefix-$3"
}

# bird NAME CONF_SOURCE NS SED...: templates a BIRD config and runs it in the namespace.
run_bird() {
  local name=$1 conf=$2 n=$3; shift 3
  sed -e "" "$@" "$conf" > "$dir/$name.conf"
  ip netns exec "$prefix-$n" bird -f -c "$dir/$name.conf" -s "$dir/$name.ctl" -P "$dir/$name.pid" \
    >> "$dir/$name.log" 2>&1 &
  for _ in $(seq 1 100); do
    birdc -s "$dir/$name.ctl" show status >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "BIRD $name did not start; $dir/$name.log:" >&2; cat "$dir/$name.log" >&2; return 1
}

bird_running() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

pod() {
  local name=$1 node=$2 addr=$3 gw=$4
  newns "$name"
  veth "$node" "v$name" "$name" eth0
  ns "$node" ip link set "v$name" master cni0 up
  ns "$name" ip addr add "$addr/24" dev eth0
  ns "$name" ip link set eth0 mtu 1450 up
  ns "$name" ip route add default via "$gw"
  ip netns exec "$prefix-$name" python3 "$here/pod.py" "$name" >/dev/null 2>&1 &
}

# node N ADDR CNI_ADDR VTEP_MAC: a Kubernetes-shaped node as in `make lab`, reaching Services
# over VXLAN through either gateway (ECMP over both gateways' VTEPs).
node() {
  local n=$1 addr=$2 cni=$3 mac=$4
  newns "$n"
  ns "$n" sysctl -qw net.ipv4.ip_forward=1
  ns "$n" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
  veth underlay "u$n" "$n" eth0
  ns underlay ip link set "u$n" master br0 up
  ns "$n" ip addr add "$addr/24" dev eth0
  ns "$n" ip link set eth0 up
  ns "$n" ip link add vxlan0 type vxlan id 42 dstport 4789 local "$addr" dev eth0 nolearning
  ns "$n" ip link set vxlan0 address "$mac" mtu 1450 up
  ns "$n" ip link add cni0 type bridge
  ns "$n" ip addr add "$cni/24" dev cni0
  ns "$n" ip link set cni0 up
  for g in 1 2; do
    ns "$n" ip neigh replace "10.244.0.$g" lladdr "${CLUSTER_MAC[$g]}" dev vxlan0 nud permanent
    ns "$n" bridge fdb append "${CLUSTER_MAC[$g]}" dev vxlan0 dst "10.0.0.$g"
  done
  ns "$n" ip route add 10.96.0.0/12 nexthop via 10.244.0.1 dev vxlan0 onlink \
                                    nexthop via 10.244.0.2 dev vxlan0 onlink
}

# attach N: moves gateway N's taps to their places, (re)starts nothing but a missing BIRD.
attach() {
  local g=$1 up="${prefix}${1}u" cl="${prefix}${1}c" exc="${prefix}${1}k"
  wait_link "$up"; wait_link "$cl"; wait_link "$exc"
  # net_tap gives a tap's kernel side the DPDK port's MAC: give bridge ports their own.
  ip link set "$up" netns "$prefix-fabric"
  ns fabric ip link set "$up" address "02:53:47:00:ff:${g}1"
  ns fabric ip link set "$up" master "br$g" up
  ip link set "$cl" netns "$prefix-underlay"
  ns underlay ip link set "$cl" address "02:53:47:00:ff:${g}2"
  ns underlay ip link set "$cl" master br0 up
  # The gateway's own kernel: its uplink address and MAC, behind the exception port.
  ip link set "$exc" netns "$prefix-gw$g"
  ns "gw$g" ip link set "$exc" address "${UPLINK_MAC[$g]}"
  ns "gw$g" ip addr add "192.168.10$g.1/24" dev "$exc"
  ns "gw$g" ip link set "$exc" up
  if ! bird_running "gw$g"; then
    run_bird "gw$g" "$root/configs/bird/gateway.conf" "gw$g" \
      -e "s/^router id .*/router id 192.168.10$g.1;/" \
      -e "s/^define LOCAL_ADDR = [0-9.]*;/define LOCAL_ADDR = 192.168.10$g.1;/" \
      -e "s/^define UPSTREAM_ADDR = [0-9.]*;/define UPSTREAM_ADDR = 192.168.10$g.2;/"
  fi
}

up() {
  down
  mkdir -p "$dir"
  for n in clients router fabric gw1 gw2 underlay; do newns "$n"; done

  # The upstream router: ECMP over the gateways, hashing on the 5-tuple.
  ns router sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1
  ns router sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
  veth clients eth0 router clients
  ns clients ip addr add 198.18.0.2/24 dev eth0
  ns clients ip link set eth0 up
  ns clients ip route add default via 198.18.0.1
  # Every address of the client /24 is local (AnyIP): a client binds to any of them.
  ns clients ip route add local "$CLIENTS_NET" dev lo
  ns clients sysctl -qw net.ipv4.ip_nonlocal_bind=1
  ns router ip addr add 198.18.0.1/24 dev clients
  ns router ip link set clients up
  ns router ip route add "$CLIENTS_NET" via 198.18.0.2
  for g in 1 2; do
    ns fabric ip link add "br$g" type bridge
    ns fabric ip link set "br$g" up
    veth fabric "r$g" router "up$g"
    ns fabric ip link set "r$g" master "br$g" up
    ns router ip addr add "192.168.10$g.2/24" dev "up$g"
    ns router ip link set "up$g" up
  done
  run_bird router "$root/configs/bird/router-example.conf" router

  ns underlay ip link add br0 type bridge
  ns underlay ip link set br0 up
  node node1 10.0.0.11 10.244.1.1 "$NODE1_VTEP_MAC"
  node node2 10.0.0.12 10.244.2.1 "$NODE2_VTEP_MAC"
  ns node1 bridge fdb append "$NODE2_VTEP_MAC" dev vxlan0 dst 10.0.0.12
  ns node1 ip neigh replace 10.244.2.0 lladdr "$NODE2_VTEP_MAC" dev vxlan0 nud permanent
  ns node1 ip route add 10.244.2.0/24 via 10.244.2.0 dev vxlan0 onlink
  ns node2 bridge fdb append "$NODE1_VTEP_MAC" dev vxlan0 dst 10.0.0.11
  ns node2 ip neigh replace 10.244.1.0 lladdr "$NODE1_VTEP_MAC" dev vxlan0 nud permanent
  ns node2 ip route add 10.244.1.0/24 via 10.244.1.0 dev vxlan0 onlink
  pod pod1 node1 10.244.1.2 10.244.1.1
  pod pod2 node1 10.244.1.3 10.244.1.1
  pod pod3 node2 10.244.2.2 10.244.2.1

  attach 1
  attach 2
  for p in pod1:10.244.1.2 pod2:10.244.1.3 pod3:10.244.2.2; do
    for _ in $(seq 1 100); do
      ns "${p%%:*}" python3 -c "import socket; socket.create_connection(('${p#*:}', 9376), 0.2)" 2>/dev/null && break
      sleep 0.1
    done
  done
}

case "$action" in
  up) up ;;
  attach) [ -n "${3:-}" ] || { echo "usage: $0 attach PREFIX 1|2" >&2; exit 2; }; attach "$3" ;;
  down) down ;;
  *) echo "usage: $0 up|attach|down PREFIX [N]" >&2; exit 2 ;;
esac
