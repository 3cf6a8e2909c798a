#!/usr/bin/env bash
# Builds (up) or removes (down) the lab network around a running servicegate:
#
#   client ns ──(tap UP_TAP)── servicegate ──(tap CL_TAP)── underlay ns (bridge)
#   10.0.0.0/24 underlay:  gateway 10.0.0.1 (VTEP) · node1 10.0.0.11 · node2 10.0.0.12
#   node1: VXLAN vni 42 port 4789, pods pod1 10.244.1.2, pod2 10.244.1.3, client pod 10.244.1.10
#   node2: pod3 10.244.2.2
#   node3 (10.0.0.13, action node3 after up: a node joining): pod4 10.244.3.2
#   exception port (EXC_TAP) lives in the "gw" ns, the gateway's own kernel (192.168.100.1).
#
# Every pod runs tests/lab/pod.py: HTTP on 9376 and UDP echo on 5353, answering its name.
# Usage: topology.sh up|node3|down PREFIX UP_TAP CL_TAP EXC_TAP
set -euo pipefail
action=$1 prefix=$2 up_tap=$3 cl_tap=$4 exc_tap=$5
here=$(cd "$(dirname "$0")" && pwd)

# MACs the gateway config names: the gateway's ports and the nodes' VXLAN devices.
UPLINK_MAC=02:53:47:00:00:01
NODE1_VTEP_MAC=02:53:47:00:01:01
NODE2_VTEP_MAC=02:53:47:00:01:02
NODE3_VTEP_MAC=02:53:47:00:01:03
CLUSTER_MAC=02:53:47:00:00:02

ns() { ip netns exec "$prefix-$1" "${@:2}"; }

down() {
  for n in client underlay node1 node2 node3 pod1 pod2 pod3 pod4 cpod gw; do
    if ip netns list | grep -qw "$prefix-$n"; then
      for pid in $(ip netns pids "$prefix-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$prefix-$n" 2>/dev/null || true
    fi
  done
}

wait_link() {
  for _ in $(seq 1 200); do [ -e "/sys/class/net/$1" ] && return 0; sleep 0.05; done
  echo "interface $1 did not appear" >&2; return 1
}

# pod NAME NODE ADDR GW: a namespace wired to its node's bridge, running the pod server.
pod() {
  local name=$1 node=$2 addr=$3 gw=$4 short=${prefix: -4}
  ip netns add "$prefix-$name"
  ns "$name" ip link set lo up
  ip link add "h$short$name" type veth peer name eth0 netns "$prefix-$name"
  ip link set "h$short$name" netns "$prefix-$node"
  ns "$node" ip link set "h$short$name" master cni0 up
  ns "$name" ip addr add "$addr/24" dev eth0
  ns "$name" ip link set eth0 mtu 1450 up
  ns "$name" ip route add default via "$gw"
  ip netns exec "$prefix-$name" python3 "$here/pod.py" "$name" >/dev/null 2>&1 &
}

# wait_pod NAME ADDR: waits (up to 10 s) for the pod's HTTP server to listen.
wait_pod() {
  for _ in $(seq 1 100); do
    ns "$1" python3 -c "import socket; socket.create_connection(('$2', 9376), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "pod $1 ($2) does not listen on 9376" >&2; return 1
}

# node N ADDR PODCIDR_GW VTEPMAC
node() {
  local n=$1 addr=$2 cni=$3 mac=$4 short=${prefix: -4}
  ip netns add "$prefix-$n"
  ns "$n" ip link set lo up
  ns "$n" sysctl -qw net.ipv4.ip_forward=1
  ns "$n" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
  ip link add "u$short$n" type veth peer name eth0 netns "$prefix-$n"
  ip link set "u$short$n" netns "$prefix-underlay"
  ns underlay ip link set "u$short$n" master br0 up
  ns "$n" ip addr add "$addr/24" dev eth0
  ns "$n" ip link set eth0 up
  ns "$n" ip link add vxlan0 type vxlan id 42 dstport 4789 local "$addr" dev eth0 nolearning
  ns "$n" ip link set vxlan0 address "$mac" mtu 1450 up
  ns "$n" ip link add cni0 type bridge
  ns "$n" ip addr add "$cni/24" dev cni0
  ns "$n" ip link set cni0 up
  # Services and the other node's pods are reached through VXLAN, flannel style: an onlink
  # next hop on vxlan0, its MAC statically known, the MAC's VTEP in the fdb.
  ns "$n" ip neigh replace 10.244.0.1 lladdr "$CLUSTER_MAC" dev vxlan0 nud permanent
  ns "$n" bridge fdb append "$CLUSTER_MAC" dev vxlan0 dst 10.0.0.1
  ns "$n" ip route add 10.96.0.0/12 via 10.244.0.1 dev vxlan0 onlink
}

# peer N ADDR NET VTEPMAC: node N reaches the pods of NET.0/24, behind the node at ADDR whose
# vxlan0 has VTEPMAC, flannel style (the fdb, a permanent neighbor NET.0, an onlink route).
peer() {
  local n=$1 addr=$2 net=$3 mac=$4
  ns "$n" bridge fdb append "$mac" dev vxlan0 dst "$addr"
  ns "$n" ip neigh replace "$net.0" lladdr "$mac" dev vxlan0 nud permanent
  ns "$n" ip route add "$net.0/24" via "$net.0" dev vxlan0 onlink
}

up() {
  down
  wait_link "$up_tap"; wait_link "$cl_tap"; wait_link "$exc_tap"
  ip netns add "$prefix-client"
  ip netns add "$prefix-underlay"
  ip netns add "$prefix-gw"
  ns client ip link set lo up
  ns underlay ip link set lo up
  ns gw ip link set lo up

  # net_tap gives the kernel side of a tap the DPDK port's MAC: give the client and the
  # underlay bridge their own, or the bridge would keep the gateway's MAC for itself.
  ip link set "$up_tap" netns "$prefix-client"
  ns client ip link set "$up_tap" address 02:53:47:00:ff:01
  ns client ip addr add 192.168.100.2/24 dev "$up_tap"
  ns client ip link set "$up_tap" mtu 1450 up
  ns client ip route add 192.0.2.0/24 via 192.168.100.1
  ns client ip route add 10.96.0.0/12 via 192.168.100.1

  # The gateway's own kernel: same address and MAC as the uplink, behind the exception port.
  ip link set "$exc_tap" netns "$prefix-gw"
  ns gw ip link set "$exc_tap" address "$UPLINK_MAC"
  ns gw ip addr add 192.168.100.1/24 dev "$exc_tap"
  ns gw ip link set "$exc_tap" up
  ip netns exec "$prefix-gw" python3 "$here/pod.py" gateway-kernel --tcp-port 2222 >/dev/null 2>&1 &

  ns underlay ip link add br0 type bridge
  ns underlay ip link set br0 up
  ip link set "$cl_tap" netns "$prefix-underlay"
  ns underlay ip link set "$cl_tap" address 02:53:47:00:ff:02
  ns underlay ip link set "$cl_tap" master br0 up

  node node1 10.0.0.11 10.244.1.1 "$NODE1_VTEP_MAC"
  node node2 10.0.0.12 10.244.2.1 "$NODE2_VTEP_MAC"
  peer node1 10.0.0.12 10.244.2 "$NODE2_VTEP_MAC"
  peer node2 10.0.0.11 10.244.1 "$NODE1_VTEP_MAC"

  pod pod1 node1 10.244.1.2 10.244.1.1
  pod pod2 node1 10.244.1.3 10.244.1.1
  pod pod3 node2 10.244.2.2 10.244.2.1
  pod cpod node1 10.244.1.10 10.244.1.1
  # Wait for every server to listen.
  wait_pod pod1 10.244.1.2
  wait_pod pod2 10.244.1.3
  wait_pod pod3 10.244.2.2
}

# A third node joins the running lab (after up), meshed with the other two, with pod4.
node3() {
  node node3 10.0.0.13 10.244.3.1 "$NODE3_VTEP_MAC"
  peer node3 10.0.0.11 10.244.1 "$NODE1_VTEP_MAC"
  peer node3 10.0.0.12 10.244.2 "$NODE2_VTEP_MAC"
  peer node1 10.0.0.13 10.244.3 "$NODE3_VTEP_MAC"
  peer node2 10.0.0.13 10.244.3 "$NODE3_VTEP_MAC"
  pod pod4 node3 10.244.3.2 10.244.3.1
  wait_pod pod4 10.244.3.2
}

case "$action" in
  up) up ;;
  node3) node3 ;;
  down) down ;;
  *) echo "usage: $0 up|node3|down PREFIX UP_TAP CL_TAP EXC_TAP" >&2; exit 2 ;;
esac
