"""Resolve atproto identities: a DID to its verified handle, a handle to its DID.

A DID document comes from the PLC directory (`did:plc`) or from the DID's own host
(`did:web`, `https://<host>/.well-known/did.json`). Its handle is the first `at://` entry of
`alsoKnownAs`, and counts only once it resolves back to the same DID, through the DNS TXT
record `_atproto.<handle>` (`did=<did>`) or `https://<handle>/.well-known/atproto-did`; a
handle that does not is shown as `handle.invalid`, as Bluesky's services show it.

Outcomes the worker acts on differently are kept apart: a definite answer (`Resolution`), the
PLC directory saying "slow down" (`RateLimited`, with its Retry-After), and a source that did
not answer (`Unavailable`). DNS is one injectable step (`TxtLookup`), so tests can point it at a
local DNS server or replace it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.resolver
import httpx
import msgspec

INVALID_HANDLE = "handle.invalid"
DEFAULT_RETRY_AFTER_S = 60.0
MAX_RETRY_AFTER_S = 3600.0
MAX_DOCUMENT_BYTES = 256 * 1024

# atproto handle syntax: a DNS name of at least two labels, the last not starting with a digit.
HANDLE_RE = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
DID_PLC_RE = re.compile(r"^did:plc:[a-z2-7]{24}$")
DID_WEB_RE = re.compile(r"^did:web:([a-z0-9.-]+)$")
DID_RE = re.compile(r"^did:[a-z]+:[a-zA-Z0-9._:%-]{1,2000}$")

Outcome = Literal["ok", "invalid", "not_found"]


class RateLimited(Exception):
    """The PLC directory answered 429: wait `retry_after_s` before the next request."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limited for {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class Unavailable(Exception):
    """A source did not answer usefully (connection error, timeout, 5xx): try again later."""

    def __init__(self, reason: str, *, plc: bool = False) -> None:
        super().__init__(reason)
        self.plc = plc  # the PLC directory itself failed (the worker slows every resolution)


@dataclass(frozen=True)
class Resolution:
    """A definite answer for a DID: its verified handle, `handle.invalid`, or no document."""

    did: str
    outcome: Outcome
    handle: str | None  # the verified handle; INVALID_HANDLE if unverified; None if not found
    claimed: str | None = None  # the handle the document claims, verified or not


class _Document(msgspec.Struct):
    id: str
    alsoKnownAs: list[str] = []


_decode_document = msgspec.json.Decoder(_Document).decode


def normalize_handle(value: str) -> str | None:
    """The handle in lower case if it is syntactically a handle, else None."""
    handle = value.strip().lower().rstrip(".")
    return handle if len(handle) <= 253 and HANDLE_RE.fullmatch(handle) else None


def handle_of(document: _Document) -> str | None:
    """The handle a DID document claims: its first at:// alias, if it is a handle."""
    for alias in document.alsoKnownAs:
        if alias.startswith("at://"):
            return normalize_handle(alias.removeprefix("at://"))
    return None


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), bounded."""
    if not value:
        return DEFAULT_RETRY_AFTER_S
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (now or time.time())
        except (TypeError, ValueError, IndexError):
            return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


# A DNS TXT lookup: the TXT strings of a name ([] if the name or record does not exist).
# Raises Unavailable when the DNS server does not answer.
TxtLookup = Callable[[str], Awaitable[list[str]]]


def dns_txt_lookup(
    servers: Sequence[str], timeout_s: float, resolv_conf: str = "/etc/resolv.conf"
) -> TxtLookup:
    """A TxtLookup through dnspython: the given servers (host or host:port), or the system's
    (from `resolv_conf`). A system with no DNS server configured gets a lookup that always
    raises Unavailable: handles then cannot be verified, and nothing crashes."""
    resolver: dns.asyncresolver.Resolver | None
    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = []
        ports: set[int] = set()
        for server in servers:
            host, sep, port = server.rpartition(":") if server.count(":") == 1 else ("", "", "")
            resolver.nameservers.append(host if sep else server)
            ports.add(int(port) if sep else 53)
        resolver.port = ports.pop() if len(ports) == 1 else 53
    else:
        try:
            resolver = dns.asyncresolver.Resolver(filename=resolv_conf)
        except dns.resolver.NoResolverConfiguration:
            resolver = None
    if resolver is not None:
        resolver.lifetime = timeout_s

    async def lookup(name: str) -> list[str]:
        if resolver is None:
            raise Unavailable(
                f"DNS {name}: no DNS server in {resolv_conf}; set APPLIANCE_IDENTITY_DNS"
            )
        try:
            answer = await resolver.resolve(name, "TXT", raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:  # timeout, no server answered, SERVFAIL
            raise Unavailable(f"DNS {name}: {type(exc).__name__}") from exc
        if answer.rrset is None:
            return []
        return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset]

    return lookup


class Resolver:
    """DID -> verified handle and handle -> DID over HTTP(S) and DNS; one per event loop."""

    def __init__(
        self,
        *,
        plc_url: str,
        timeout_s: float,
        txt: TxtLookup,
        web_origin: str = "",
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.plc_url = plc_url.rstrip("/")
        self.web_origin = web_origin.rstrip("/")
        self.txt = txt
        self._client = client or httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            headers={"User-Agent": "bluesky-appliance identity resolver"},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # --- HTTP ---------------------------------------------------------------------------------

    async def _get_web(self, host: str, path: str) -> httpx.Response:
        """GET https://<host><path>, or through the test origin with the Host header kept."""
        if self.web_origin:
            return await self._client.get(self.web_origin + path, headers={"Host": host})
        return await self._client.get(f"https://{host}{path}")

    async def document(self, did: str) -> _Document | None:
        """A DID's document; None if its source says it does not exist (404/410)."""
        plc = did.startswith("did:plc:")
        web = DID_WEB_RE.fullmatch(did)
        if not plc and web is None:
            return None  # another DID method, or did:web with a path: atproto allows neither
        try:
            if plc:
                response = await self._client.get(f"{self.plc_url}/{did}")
            else:
                assert web is not None
                response = await self._get_web(web.group(1), "/.well-known/did.json")
        except httpx.HTTPError as exc:
            raise Unavailable(f"{did}: {type(exc).__name__}", plc=plc) from exc
        if response.status_code == 429 and plc:
            raise RateLimited(retry_after(response.headers.get("Retry-After")))
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise Unavailable(f"{did}: HTTP {response.status_code}", plc=plc)
        if len(response.content) > MAX_DOCUMENT_BYTES:
            return None
        try:
            document = _decode_document(response.content)
        except msgspec.DecodeError:
            return None  # not a DID document: as good as none
        return document if document.id == did else None

    # --- handles ------------------------------------------------------------------------------

    async def handle_to_did(self, handle: str) -> str | None:
        """The DID a handle names, by DNS TXT first, then HTTPS; None if neither names one.

        Raises Unavailable when a method gave no definite answer (a DNS or connection error, a
        timeout, 5xx or 429) and the other did not name a DID: the handle may well be valid.
        """
        failures: list[str] = []
        try:
            records = await self.txt(f"_atproto.{handle}")
        except Unavailable as exc:
            failures.append(str(exc))
        else:
            dids = {r.removeprefix("did=").strip() for r in records if r.startswith("did=")}
            if len(dids) == 1:
                did = dids.pop()
                if DID_RE.fullmatch(did):
                    return did
        try:
            response = await self._get_web(handle, "/.well-known/atproto-did")
        except httpx.HTTPError as exc:
            failures.append(f"HTTPS {handle}: {type(exc).__name__}")
            raise Unavailable("; ".join(failures)) from exc
        if response.status_code == 200:
            lines = response.content[:2048].decode("utf-8", "replace").splitlines()
            did = lines[0].strip() if lines else ""
            if DID_RE.fullmatch(did):
                return did
        elif response.status_code >= 500 or response.status_code == 429:
            failures.append(f"HTTPS {handle}: HTTP {response.status_code}")
        if failures:  # one method said no, the other did not answer: not a definite no
            raise Unavailable("; ".join(failures))
        return None

    async def resolve_did(self, did: str) -> Resolution:
        """A DID's handle, verified back through DNS or HTTPS.

        Raises RateLimited (PLC 429) or Unavailable (a source did not answer; a handle whose
        verification could not be completed counts as unavailable, not as invalid).
        """
        document = await self.document(did)
        if document is None:
            return Resolution(did, "not_found", None)
        claimed = handle_of(document)
        if claimed is None:
            return Resolution(did, "invalid", INVALID_HANDLE)
        if await self.handle_to_did(claimed) == did:
            return Resolution(did, "ok", claimed, claimed)
        return Resolution(did, "invalid", INVALID_HANDLE, claimed)

    async def verified_did(self, handle: str) -> str | None:
        """The DID of a handle, checked against that DID's document when it can be fetched
        (a handle the document does not claim names no one); None if unresolvable."""
        did = await self.handle_to_did(handle)
        if did is None:
            return None
        try:
            document = await self.document(did)
        except (RateLimited, Unavailable):
            return did  # the handle's own domain vouches for it; the document is unreachable
        if document is None or handle_of(document) != handle:
            return None
        return did


async def with_timeout(awaitable: Awaitable[Any], seconds: float) -> Any:
    """Await with a deadline; a timeout becomes Unavailable."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError as exc:
        raise Unavailable(f"no answer within {seconds:g} s") from exc
