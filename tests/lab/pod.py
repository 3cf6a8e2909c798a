#!/usr/bin/env python3
"""A lab pod, like Kubernetes' serve_hostname: HTTP on 9376 answers the pod's name (one
line per request, keep-alive so a long-lived connection can stream requests), UDP on 5353
echoes the pod's name. `--tcp-port` adds a plain TCP greeter (the gateway's "SSH")."""

import argparse
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("name")
parser.add_argument("--http-port", type=int, default=9376)
parser.add_argument("--udp-port", type=int, default=5353)
parser.add_argument("--tcp-port", type=int, default=0)
args = parser.parse_args()
NAME = args.name.encode()


class Hostname(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = NAME + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(NAME + b" " + data, self.client_address)


class Greeter(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"SSH-2.0-" + NAME + b"\r\n")
        self.request.recv(100)


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


ThreadingHTTPServer.daemon_threads = True
servers = []
if args.tcp_port:
    servers.append(Threaded(("0.0.0.0", args.tcp_port), Greeter))
else:
    servers.append(ThreadingHTTPServer(("0.0.0.0", args.http_port), Hostname))
    servers.append(socketserver.ThreadingUDPServer(("0.0.0.0", args.udp_port), Echo))
threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
for t in threads:
    t.start()
for t in threads:
    t.join()
