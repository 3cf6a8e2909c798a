#!/usr/bin/env python3
"""Kernel clients for the lab tests; every mode prints one JSON object.

  count URL N                 N new HTTP connections: {"counts": {pod: n}, "failed": n}
  stream URL SECONDS OUT      one keep-alive connection, requests back to back for SECONDS;
                              writes {"requests", "failed", "backends": [...]} to OUT
  udp HOST PORT N             N datagrams from fresh sockets: {"counts": {...}, "failed": n}
  connect HOST PORT           one TCP connect: {"result": "ok|refused|timeout|error", "seconds": s}
"""

import collections
import http.client
import json
import socket
import sys
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


mode, args = sys.argv[1], sys.argv[2:]
if mode == "count":
    out = count(args[0], int(args[1]))
elif mode == "stream":
    out = stream(args[0], float(args[1]), args[2])
elif mode == "udp":
    out = udp(args[0], int(args[1]), int(args[2]))
elif mode == "connect":
    out = connect(args[0], int(args[1]))
else:
    sys.exit("unknown mode " + mode)
print(json.dumps(out))
