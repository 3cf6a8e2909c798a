#!/usr/bin/env python3
"""Kernel clients for the lab tests; every mode prints one JSON object.

  count URL N                 N new HTTP connections: {"counts": {pod: n}, "failed": n}
  stream URL SECONDS OUT      one keep-alive connection, requests back to back for SECONDS;
                              writes {"requests", "failed", "backends": [...]} to OUT
  udp HOST PORT N             N datagrams from fresh sockets: {"counts": {...}, "failed": n}
  connect HOST PORT           one TCP connect: {"result": "ok|refused|timeout|error", "seconds": s}

Fleet modes (tests/lab/fleet.sh: the client namespace owns every address of SOURCES, a CIDR):
  spread URL N SOURCES        N new connections, the i-th from the i-th address of SOURCES
                              (cycling), ephemeral ports: {"counts", "failed"}
  tuples URL N SOURCES HOSTS PORT_BASE
                              N new connections with fixed 5-tuples: the i-th from address
                              i mod HOSTS of SOURCES, port PORT_BASE + i, closed with a RST (no
                              TIME_WAIT, so the same tuples can be sent again; keep fixed ports
                              below ip_local_port_range, 32768):
                              {"backends": [pod or "failed: reason", ...]}
  load URL RATE SOURCES OUT   new connections at RATE per second (each its own thread, 3 s
                              timeout, source addresses cycling) until SIGTERM, then writes
                              {"total", "failed", "slow", "median_ms", "max_ms",
                               "failures": [{t (start, unix time), seconds, error}],
                               "backends": {pod: {count, first, last (start, unix time)}}}
  streams URL N SOURCES PORT_BASE OUT
                              N keep-alive connections from fixed tuples (the i-th address of
                              SOURCES, port PORT_BASE + i), a request on each every 100 ms until
                              SIGTERM; a connection whose request fails is broken and stops:
                              {"connections": [{"source", "requests", "broken", "error", "backends"}]}

Soak modes (tests/tests/soak.rs; SOURCE is one local address, ephemeral ports):
  paced URL RATE SOURCE OUT   new connections at RATE per second on a fixed schedule (each its
                              own thread, 10 s timeout) until SIGTERM, then waits for those in
                              flight (up to 15 s: "unfinished" counts the rest) and writes
                              {"total", "failed", "unfinished", "slow" (> 1 s), "seconds", "rate",
                              "max_lag_ms", "max_in_flight", "median_ms", "p99_ms", "max_ms",
                              "failures": [first 20: {t, seconds, error}], "backends": {pod: n}}
  keepalive URL N INTERVAL SOURCE OUT
                              N keep-alive connections, a request on each every INTERVAL
                              seconds until SIGTERM; a failed request counts, and the
                              connection is opened again (never silently: "ports" lists every
                              local port a connection had): {"connections": [{"requests",
                              "failed", "ports", "backends", "errors"}], "requests", "failed"}
"""

import collections
import http.client
import ipaddress
import json
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request


def count(url, n):
    counts, failed = collections.Counter(), 0
    for _ in range(n):
        try:
            counts[urllib.request.urlopen(url, timeout=3).read().decode().strip()] += 1
        except Exception:
            failed += 1
    return {"counts": counts, "failed": failed}


def stream(url, seconds, out):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=3)
    requests, failed, backends = 0, 0, []
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            conn.request("GET", parts.path or "/")
            body = conn.getresponse().read().decode().strip()
            requests += 1
            if not backends or backends[-1] != body:
                backends.append(body)
        except Exception as e:
            failed += 1
            backends.append("error: %s" % type(e).__name__)
            time.sleep(0.05)
        time.sleep(0.01)
    result = {"requests": requests, "failed": failed, "backends": backends}
    with open(out, "w") as f:
        json.dump(result, f)
    return result


def udp(host, port, n):
    counts, failed = collections.Counter(), 0
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(b"ping %d" % i, (host, port))
            counts[s.recv(200).decode().split()[0]] += 1
        except Exception:
            failed += 1
        finally:
            s.close()
    return {"counts": counts, "failed": failed}


def connect(host, port):
    start = time.time()
    try:
        socket.create_connection((host, port), timeout=5).close()
        result = "ok"
    except ConnectionRefusedError:
        result = "refused"
    except socket.timeout:
        result = "timeout"
    except OSError as e:
        result = "error: %s" % e
    return {"result": result, "seconds": round(time.time() - start, 3)}


def hosts(cidr):
    return [str(h) for h in ipaddress.ip_network(cidr).hosts()]


def get(url, source, timeout):
    """One new connection from `source` (addr, port): the body. A fixed port is bound with
    SO_REUSEADDR and closed with a RST, so the same tuple can be used again at once."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.sock = fixed_socket(parts, source, timeout) if source[1] else \
            socket.create_connection((parts.hostname, parts.port or 80), timeout, source)
        conn.request("GET", parts.path or "/")
        return conn.getresponse().read().decode().strip()
    finally:
        conn.close()


def fixed_socket(parts, source, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.settimeout(timeout)
        s.bind(source)
        s.connect((parts.hostname, parts.port or 80))
        return s
    except Exception:
        s.close()
        raise


def spread(url, n, sources):
    addrs, counts, failed = hosts(sources), collections.Counter(), 0
    for i in range(n):
        try:
            counts[get(url, (addrs[i % len(addrs)], 0), 3)] += 1
        except Exception:
            failed += 1
    return {"counts": counts, "failed": failed}


def tuples(url, n, sources, nhosts, port_base):
    addrs, backends = hosts(sources)[:nhosts], []
    for i in range(n):
        try:
            backends.append(get(url, (addrs[i % len(addrs)], port_base + i), 3))
        except Exception as e:
            backends.append("failed: %s" % type(e).__name__)
    return {"backends": backends}


stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())


def load(url, rate, sources, out):
    addrs, lock, results, threads = hosts(sources), threading.Lock(), [], []

    def one(source):
        start = time.time()
        try:
            body, error = get(url, source, 3), None
        except Exception as e:
            body, error = None, type(e).__name__
        with lock:
            results.append((start, time.time() - start, error, body))

    start, i = time.time(), 0
    while not stop.is_set():
        t = threading.Thread(target=one, args=((addrs[i % len(addrs)], 0),))
        t.start()
        threads.append(t)
        i += 1
        stop.wait(max(0.0, start + i / rate - time.time()))
    for t in threads:
        t.join()
    results.sort(key=lambda r: r[0])
    failures = [{"t": round(s, 4), "seconds": round(d, 4), "error": e}
                for s, d, e, _ in results if e]
    ok = [d for _, d, e, _ in results if not e]
    backends = {}
    for s, _, e, body in results:
        if not e:
            b = backends.setdefault(body, {"count": 0, "first": round(s, 4)})
            b["count"] += 1
            b["last"] = round(s, 4)
    result = {"total": len(results), "failed": len(failures),
              "slow": sum(1 for d in ok if d > 0.5),
              "median_ms": round(statistics.median(ok) * 1000, 2) if ok else None,
              "max_ms": round(max(ok) * 1000, 2) if ok else None,
              "started": round(start, 3), "failures": failures, "backends": backends}
    with open(out, "w") as f:
        json.dump(result, f)
    return result


def streams(url, n, sources, port_base, out):
    parts = urllib.parse.urlsplit(url)
    addrs, states = hosts(sources), []

    def run(state):
        source = (addrs[state["index"]], port_base + state["index"])
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=2)
            conn.sock = fixed_socket(parts, source, 2)
            while not stop.is_set():
                conn.request("GET", parts.path or "/")
                body = conn.getresponse().read().decode().strip()
                state["requests"] += 1
                if body not in state["backends"]:
                    state["backends"].append(body)
                stop.wait(0.1)
            conn.close()
        except Exception as e:
            state["broken"], state["error"] = round(time.time(), 3), type(e).__name__

    for i in range(n):
        states.append({"index": i, "source": "%s:%d" % (addrs[i], port_base + i),
                       "requests": 0, "broken": None, "error": None, "backends": []})
    threads = [threading.Thread(target=run, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {"connections": states}
    with open(out, "w") as f:
        json.dump(result, f)
    return result


def paced(url, rate, source, out):
    lock, durations, failures, backends = threading.Lock(), [], [], collections.Counter()
    counts = {"total": 0, "failed": 0, "in_flight": 0, "max_in_flight": 0}

    def one(start):
        try:
            body, error = get(url, (source, 0), 10), None
        except Exception as e:
            body, error = None, "%s: %s" % (type(e).__name__, e)
        seconds = time.time() - start
        with lock:
            counts["total"] += 1
            counts["in_flight"] -= 1
            if error:
                counts["failed"] += 1
                if len(failures) < 20:
                    failures.append({"t": round(start, 3), "seconds": round(seconds, 3),
                                     "error": error})
            else:
                durations.append(seconds)
                backends[body] += 1

    start, i, max_lag = time.time(), 0, 0.0
    while not stop.is_set():
        now = time.time()
        max_lag = max(max_lag, now - (start + i / rate))
        with lock:
            counts["in_flight"] += 1
            counts["max_in_flight"] = max(counts["max_in_flight"], counts["in_flight"])
        threading.Thread(target=one, args=(now,), daemon=True).start()
        i += 1
        stop.wait(max(0.0, start + i / rate - time.time()))
    seconds = time.time() - start
    deadline = time.time() + 15
    while time.time() < deadline:
        with lock:
            if counts["in_flight"] == 0:
                break
        time.sleep(0.05)
    with lock:
        durations.sort()
        result = {"total": counts["total"], "failed": counts["failed"],
                  "unfinished": counts["in_flight"],
                  "slow": sum(1 for d in durations if d > 1.0),
                  "started": i, "seconds": round(seconds, 3),
                  "rate": round(i / seconds, 2) if seconds else None,
                  "max_lag_ms": round(max_lag * 1000, 1),
                  "max_in_flight": counts["max_in_flight"],
                  "median_ms": round(durations[len(durations) // 2] * 1000, 2) if durations else None,
                  "p99_ms": round(durations[int(len(durations) * 0.99)] * 1000, 2) if durations else None,
                  "max_ms": round(durations[-1] * 1000, 2) if durations else None,
                  "failures": failures, "backends": dict(backends)}
    with open(out, "w") as f:
        json.dump(result, f)
    return result


def keepalive(url, n, interval, source, out):
    parts = urllib.parse.urlsplit(url)
    states = [{"requests": 0, "failed": 0, "ports": [], "backends": [], "errors": []}
              for _ in range(n)]

    def run(index, state):
        stop.wait(interval * index / n)  # spread the connections' requests over the interval
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                      timeout=10, source_address=(source, 0))
                    conn.connect()
                    conn.auto_open = 0  # a connection the server closed is a failure, not reopened
                    state["ports"].append(conn.sock.getsockname()[1])
                conn.request("GET", parts.path or "/")
                body = conn.getresponse().read().decode().strip()
                state["requests"] += 1
                if body not in state["backends"]:
                    state["backends"].append(body)
            except Exception as e:
                state["failed"] += 1
                if len(state["errors"]) < 5:
                    state["errors"].append({"t": round(time.time(), 3),
                                            "error": "%s: %s" % (type(e).__name__, e)})
                if conn is not None:
                    conn.close()
                conn = None
            stop.wait(interval)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(states)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join()
    result = {"connections": states, "requests": sum(s["requests"] for s in states),
              "failed": sum(s["failed"] for s in states)}
    with open(out, "w") as f:
        json.dump(result, f)
    return result


mode, args = sys.argv[1], sys.argv[2:]
if mode == "count":
    out = count(args[0], int(args[1]))
elif mode == "stream":
    out = stream(args[0], float(args[1]), args[2])
elif mode == "udp":
    out = udp(args[0], int(args[1]), int(args[2]))
elif mode == "spread":
    out = spread(args[0], int(args[1]), args[2])
elif mode == "tuples":
    out = tuples(args[0], int(args[1]), args[2], int(args[3]), int(args[4]))
elif mode == "load":
    out = load(args[0], float(args[1]), args[2], args[3])
elif mode == "streams":
    out = streams(args[0], int(args[1]), args[2], int(args[3]), args[4])
elif mode == "paced":
    out = paced(args[0], float(args[1]), args[2], args[3])
elif mode == "keepalive":
    out = keepalive(args[0], int(args[1]), float(args[2]), args[3], args[4])
elif mode == "connect":
    out = connect(args[0], int(args[1]))
else:
    sys.exit("unknown mode " + mode)
print(json.dumps(out))
