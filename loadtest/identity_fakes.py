"""Loopback fakes of what the identity resolver talks to, speaking the real protocols (used
by tests/test_identity.py and `loadtest identity-replay`).

- `IdentityWeb`: one HTTP server that is the PLC directory (`GET /did:plc:...` -> the DID
  document JSON, 404 if unknown) and every handle's and did:web host's HTTPS side
  (`GET /.well-known/atproto-did` and `/.well-known/did.json`, chosen by the Host header, as the
  resolver sends them with `identity_web_origin`). It can answer 429 with a Retry-After or 503,
  and it logs the time of every PLC request. With `auto`, every did:plc has a document claiming
  `<its 24 letters>.auto.test`, and that host's atproto-did names it back.
- `DnsServer`: a UDP DNS server (dnspython's wire format) answering TXT queries from a dict,
  NXDOMAIN otherwise.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dns.message
import dns.rcode
import dns.rrset

AUTO_SUFFIX = ".auto.test"


def plc_document(did: str, handle: str | None) -> dict[str, Any]:
    """A DID document as the PLC directory serves it."""
    return {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"] if handle else [],
        "verificationMethod": [],
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "https://pds.example.com",
            }
        ],
    }


@dataclass
class WebState:
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)  # did -> document
    atproto_did: dict[str, str] = field(default_factory=dict)  # handle host -> body
    did_web: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> did.json
    rate_limited: int = 0  # answer this many PLC requests with 429
    retry_after: str = "1"
    down: bool = False  # answer every PLC request with 503
    auto: bool = False  # every did:plc exists, with a handle that verifies over HTTPS
    plc_requests: list[tuple[float, str, int]] = field(default_factory=list)  # (time, did, status)
    web_requests: list[tuple[str, str]] = field(default_factory=list)  # (host, path)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?")[0]
        if path.startswith("/did:"):
            did = path[1:]
            with state.lock:
                if state.down:
                    status = 503
                elif state.rate_limited > 0:
                    state.rate_limited -= 1
                    status = 429
                elif state.auto and did.startswith("did:plc:"):
                    status = 200
                else:
                    status = 200 if did in state.documents else 404
                state.plc_requests.append((time.monotonic(), did, status))
                document = state.documents.get(did)
                if document is None and status == 200:
                    document = plc_document(did, f"{did.removeprefix('did:plc:')}{AUTO_SUFFIX}")
            if status == 429:
                self._send(
                    429,
                    b'{"error":"RateLimitExceeded"}',
                    "application/json",
                    {"Retry-After": state.retry_after},
                )
            elif status == 200:
                self._send(200, json.dumps(document).encode(), "application/did+ld+json")
            else:
                self._send(status, b'{"message":"DID not registered"}', "application/json")
            return
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        with state.lock:
            state.web_requests.append((host, path))
        if path == "/.well-known/atproto-did" and host in state.atproto_did:
            self._send(200, state.atproto_did[host].encode(), "text/plain")
        elif path == "/.well-known/atproto-did" and state.auto and host.endswith(AUTO_SUFFIX):
            self._send(200, f"did:plc:{host.removesuffix(AUTO_SUFFIX)}".encode(), "text/plain")
        elif path == "/.well-known/did.json" and host in state.did_web:
            self._send(200, json.dumps(state.did_web[host]).encode(), "application/json")
        else:
            self._send(404, b"not found", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops a burst's SYNs (retried a second later)
    state: WebState


class IdentityWeb:
    """The PLC directory and the handles' web hosts on one loopback port."""

    def __init__(self) -> None:
        self.state = WebState()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, did: str, handle: str | None, *, atproto_did: str | None = None) -> None:
        """Register a DID document claiming `handle`; with `atproto_did`, the handle's host
        answers /.well-known/atproto-did with it."""
        with self.state.lock:
            self.state.documents[did] = plc_document(did, handle)
            if handle and atproto_did is not None:
                self.state.atproto_did[handle.lower()] = atproto_did

    def plc_requests(self, did: str | None = None) -> list[tuple[float, str, int]]:
        with self.state.lock:
            return [r for r in self.state.plc_requests if did is None or r[1] == did]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _DnsHandler(socketserver.BaseRequestHandler):
    server: _DnsUdp

    def handle(self) -> None:
        data, sock = self.request
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        with self.server.lock:
            self.server.queries.append(name)
            values = self.server.records.get(name)
        if values is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            texts = [json.dumps(v) for v in values]  # quoted character-strings
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", "TXT", texts))
        sock.sendto(response.to_wire(), self.client_address)


class _DnsUdp(socketserver.ThreadingUDPServer):
    daemon_threads = True
    records: dict[str, list[str]]
    queries: list[str]
    lock: threading.Lock


class DnsServer:
    """A DNS server on a loopback UDP port answering TXT records from `records`."""

    def __init__(self) -> None:
        self._server = _DnsUdp(("127.0.0.1", 0), _DnsHandler)
        self._server.records = {}
        self._server.queries = []
        self._server.lock = threading.Lock()
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def txt(self, name: str, *values: str) -> None:
        with self._server.lock:
            self._server.records[name.lower()] = list(values)

    @property
    def queries(self) -> list[str]:
        with self._server.lock:
            return list(self._server.queries)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
