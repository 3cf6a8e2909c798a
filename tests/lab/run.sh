#!/usr/bin/env bash
# The lab: servicegate between an external client and a two-node, VXLAN-connected
# "cluster" of network namespaces, serving configs/lab/ Services from the files source.
# Shows which pod answers ClusterIP, NodePort and LoadBalancer traffic, the gateway's own
# view (ctl services / conntrack), then removes a pod from an EndpointSlice and shows the
# traffic move. Tears everything down at the end and on Ctrl-C.
#   tests/lab/run.sh [--virtio]      (as root; `make lab` builds first)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${SERVICEGATE_BIN:-$root/target/release/servicegate}
virtio=0
[ "${1:-}" = "--virtio" ] && virtio=1
prefix=sglab
work=$(mktemp -d /tmp/servicegate-lab.XXXXXX)
admin=127.0.0.1:9900
gw_pid=
started=$(date +%s.%N)

cleanup() {
  set +e
  if [ -n "$gw_pid" ] && kill -0 "$gw_pid" 2>/dev/null; then
    kill -INT "$gw_pid"; wait "$gw_pid" 2>/dev/null
  fi
  bash "$root/tests/lab/topology.sh" down "$prefix" sg-up sg-cl sg-up-k
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ns() { ip netns exec "$prefix-$1" "${@:2}"; }

[ -x "$bin" ] || { echo "no $bin: run 'cargo build --release' (make lab does)" >&2; exit 1; }
mkdir -p "$work/manifests"
cp "$root"/configs/lab/*.yaml "$work/manifests/"
sed -e "s#path: lab #path: $work/manifests #" "$root/configs/lab.yaml" > "$work/gateway.yaml"
if [ $virtio = 1 ]; then
  modprobe vhost_net 2>/dev/null || true
  [ -e /dev/vhost-net ] || { echo "the --virtio lab needs vhost-net (/dev/vhost-net); this kernel has none" >&2; exit 1; }
  sed -i -e 's#net_tap0,iface=sg-up,#net_virtio_user0,path=/dev/vhost-net,queue_size=1024,iface=sg-up,#' \
         -e 's#net_tap1,iface=sg-cl,#net_virtio_user1,path=/dev/vhost-net,queue_size=1024,iface=sg-cl,#' "$work/gateway.yaml"
fi

say "servicegate check"
"$bin" check --config "$work/gateway.yaml"

say "starting servicegate (DPDK, net_tap ports)"
"$bin" run --config "$work/gateway.yaml" > "$work/gateway.out" 2> "$work/gateway.log" &
gw_pid=$!
# The ports must be started (admin API up) before their taps move into namespaces.
for _ in $(seq 1 200); do
  curl -sf "http://$admin/readyz" >/dev/null && break
  kill -0 "$gw_pid" 2>/dev/null || { cat "$work/gateway.log" >&2; exit 1; }
  sleep 0.1
done
bash "$root/tests/lab/topology.sh" up "$prefix" sg-up sg-cl sg-up-k

# requests NS URL N: N new connections, prints a per-pod count.
requests() {
  ns "$1" python3 - "$2" "$3" <<'PY'
import collections, sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
counts = collections.Counter()
for _ in range(n):
    try:
        counts[urllib.request.urlopen(url, timeout=2).read().decode().strip()] += 1
    except Exception as e:
        counts["failed (%s)" % type(e).__name__] += 1
print("   ", ", ".join("%s: %d" % kv for kv in sorted(counts.items())))
PY
}

say "30 requests to the ClusterIP 10.96.0.10:80 from a pod on node1 (over VXLAN)"
requests cpod http://10.96.0.10/ 30
say "30 requests to the NodePort 192.168.100.1:30080 from the external client"
requests client http://192.168.100.1:30080/ 30
say "30 requests to the LoadBalancer IP 192.0.2.100:80 from the external client"
requests client http://192.0.2.100/ 30
say "UDP to 10.96.0.20:53 from the pod on node1"
ns cpod python3 -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
for i in range(5):
    s.sendto(b'ping %d' % i, ('10.96.0.20', 53)); print('   ', s.recv(100).decode())
"
say "sessionAffinity: ClientIP (10.96.0.30) pins the client"
requests cpod http://10.96.0.30/ 10

say "servicegate ctl services"
"$bin" ctl --admin "$admin" services | head -20
say "servicegate ctl conntrack (first 8)"
"$bin" ctl --admin "$admin" conntrack --limit 8
say "servicegate ctl trace 'tcp 192.168.100.2:40000 -> 192.168.100.1:30080'"
"$bin" ctl --admin "$admin" trace "tcp 192.168.100.2:40000 -> 192.168.100.1:30080" | head -30

say "removing pod3 (10.244.2.2) from the web EndpointSlice"
python3 - "$work/manifests/endpointslices.yaml" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
docs = text.split("\n---")
for i, doc in enumerate(docs):
    if re.search(r"name: web\n", doc) and "kubernetes.io/service-name: web\n" in doc:
        docs[i] = re.sub(r'\n  - addresses: \["10\.244\.2\.2"\](?:\n    .*)*', "", doc)
open(path, "w").write("\n---".join(docs))
PY
sleep 0.5
say "30 requests to the ClusterIP again: pod3 gets none"
requests cpod http://10.96.0.10/ 30

say "the gateway's own address: a TCP connection to 192.168.100.1:2222 reaches its kernel (exception path)"
ns client python3 -c "
import socket; s = socket.create_connection(('192.168.100.1', 2222), 2); print('   ', s.recv(100).decode().strip())"

say "metrics excerpt"
curl -s "http://$admin/metrics" | grep -E '^servicegate_(drops_total|rx_packets_total|snapshot_generation|conntrack_entries)' | grep -v ' 0$' | head -15

ended=$(date +%s.%N)
say "lab done in $(python3 -c "print(round($ended - $started, 1))") s; tearing down"
