"""A small stateful fake of the Hetzner Cloud API on loopback, for the provisioning tests.

It speaks the JSON the `hcloud` library parses (servers, volumes, firewalls, ssh_keys, primary_ips,
actions, the catalogue of server types, locations and images), with Hetzner's pagination
(`meta.pagination`, `per_page` capped like the real API caps it at 50) and its error bodies
(`{"error": {"code": ..., "message": ..., "details": ...}}` with the documented HTTP status).

Tests steer it with `fail()` (the next matching requests answer with an error) and
`fail_action()` (the next action of a command ends in status "error"), and read `requests`
(every method and path it answered) and `state` (what exists).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.hcloud_catalogue import CREATED, IMAGES, LOCATIONS, SERVER_TYPES

TOKEN = "fake-hcloud-token"

# Which resource a path names, and the key its JSON object is wrapped in.
RESOURCES = {
    "servers": "server",
    "volumes": "volume",
    "firewalls": "firewall",
    "ssh_keys": "ssh_key",
    "primary_ips": "primary_ip",
}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: Any = None
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details
        self.headers: dict[str, str] = dict(headers or {})


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    code: str
    message: str
    times: int
    headers: dict[str, str]
    details: Any = None


@dataclass
class FakeHetzner:
    """The fake API's state and its HTTP server. `start()` returns the endpoint URL."""

    token: str = TOKEN
    per_page_cap: int = 50
    # The public IPv4 the next primary IP gets (the end-to-end test: the booted host's address).
    next_ipv4: Callable[[], str] | None = None
    # The id of the next volume (the end-to-end test: the booted host's /dev/disk/by-id/...).
    next_volume_id: int | None = None
    state: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in [*RESOURCES, "actions"]}
    )
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    action_faults: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    last_id: int = 999
    last_ip: int = 9
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    # --- control (tests) ------------------------------------------------------------------------

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        code: str,
        message: str,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        details: Any = None,
    ) -> None:
        """Answer the next `times` requests matching METHOD and the path regex with an error."""
        self.faults.append(
            Fault(method, re.compile(path), status, code, message, times, headers or {}, details)
        )

    def fail_action(self, command: str, code: str, message: str) -> None:
        """The next action of `command` (e.g. "create_server") ends in status "error"."""
        self.action_faults.setdefault(command, []).append((code, message))

    def snapshot(self) -> dict[str, Any]:
        """Everything that exists, to start another fake from (see `restore`)."""
        with self.lock:
            return copy.deepcopy(
                {"state": self.state, "last_id": self.last_id, "last_ip": self.last_ip}
            )

    def restore(self, snapshot: dict[str, Any]) -> None:
        with self.lock:
            saved = copy.deepcopy(snapshot)
            self.state, self.last_id, self.last_ip = (
                saved["state"],
                saved["last_id"],
                saved["last_ip"],
            )

    def _new_id(self) -> int:
        self.last_id += 1
        return self.last_id

    def _new_ip(self) -> str:
        self.last_ip += 1
        return f"203.0.113.{self.last_ip}"

    def writes(self) -> list[tuple[str, str]]:
        """Every request that could change something (POST, PUT, DELETE)."""
        return [r for r in self.requests if r[0] != "GET"]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.state[kind].values() if o["name"] == name), None)

    def add(self, kind: str, **values: Any) -> dict[str, Any]:
        """Put a resource into the project directly (as if made elsewhere)."""
        with self.lock:
            obj = self._new(kind, values)
            self.state[kind][obj["id"]] = obj
            return obj

    # --- HTTP ---------------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        path = url.path.removeprefix("/v1")
        query = {k: v for k, v in parse_qs(url.query).items()}
        length = int(request.headers.get("Content-Length") or 0)
        body: dict[str, Any] = json.loads(request.rfile.read(length) or b"{}") if length else {}
        with self.lock:
            self.requests.append((request.command, path))
            try:
                if request.headers.get("Authorization") != f"Bearer {self.token}":
                    raise ApiError(401, "unauthorized", "unable to authenticate")
                self._inject_fault(request.command, path)
                status, payload = self._route(request.command, path, query, body)
                headers: dict[str, str] = {}
            except ApiError as exc:
                status = exc.status
                payload = {
                    "error": {"code": exc.code, "message": exc.message, "details": exc.details}
                }
                headers = exc.headers
        data = json.dumps(payload).encode() if payload is not None else b""
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Correlation-Id", f"fake-{len(self.requests)}")
        for name, value in headers.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def _inject_fault(self, method: str, path: str) -> None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.path.search(path):
                fault.times -= 1
                raise ApiError(
                    fault.status, fault.code, fault.message, fault.details, fault.headers
                )

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]
    ) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        catalogue = {"locations": LOCATIONS, "server_types": SERVER_TYPES, "images": IMAGES}
        if method == "GET" and parts[0] in catalogue and len(parts) == 1:
            return 200, self._page(parts[0], list(catalogue[parts[0]].values()), query)
        if parts[-2:-1] == ["actions"] and method == "GET":
            return 200, {"action": self._poll_action(int(parts[-1]))}
        kind = parts[0]
        if kind not in RESOURCES:
            raise ApiError(404, "not_found", f"no such path {path}")
        if len(parts) == 1 and method == "GET":
            return 200, self._page(kind, self._filtered(kind, query), query)
        if len(parts) == 1 and method == "POST":
            return 201, getattr(self, f"_create_{kind}")(body)
        obj = self._get(kind, int(parts[1]))
        if len(parts) == 2 and method == "GET":
            return 200, {RESOURCES[kind]: self._view(kind, obj)}
        if len(parts) == 2 and method == "DELETE":
            return self._delete(kind, obj)
        if len(parts) == 4 and parts[2] == "actions" and method == "POST":
            return 201, getattr(self, f"_{kind}_{parts[3]}")(obj, body)
        raise ApiError(404, "not_found", f"no such path {path}")

    # --- lists --------------------------------------------------------------------------------

    def _filtered(self, kind: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        items = [self._view(kind, o) for o in sorted(self.state[kind].values(), key=_id)]
        if "name" in query:
            items = [o for o in items if o["name"] == query["name"][0]]
        if "fingerprint" in query:
            items = [o for o in items if o["fingerprint"] == query["fingerprint"][0]]
        if "label_selector" in query:
            wanted = dict(
                pair.split("=", 1) for pair in query["label_selector"][0].split(",") if pair
            )
            items = [o for o in items if wanted.items() <= o["labels"].items()]
        return items

    def _page(self, kind: str, items: list[Any], query: dict[str, list[str]]) -> dict[str, Any]:
        if kind in ("locations", "server_types", "images") and "name" in query:
            items = [o for o in items if o["name"] == query["name"][0]]
        per_page = min(int(query.get("per_page", ["25"])[0]), self.per_page_cap)
        page = int(query.get("page", ["1"])[0])
        last = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        return {
            kind: chunk,
            "meta": {
                "pagination": {
                    "page": page,
                    "per_page": per_page,
                    "previous_page": page - 1 if page > 1 else None,
                    "next_page": page + 1 if page < last else None,
                    "last_page": last,
                    "total_entries": len(items),
                }
            },
        }

    # --- objects ------------------------------------------------------------------------------

    def _get(self, kind: str, ident: int) -> dict[str, Any]:
        obj = self.state[kind].get(ident)
        if obj is None:
            raise ApiError(404, "not_found", f"{RESOURCES[kind]} with ID '{ident}' not found")
        return obj

    def _unique_name(self, kind: str, name: str) -> None:
        if self.named(kind, name) is not None:
            raise ApiError(
                409,
                "uniqueness_error",
                "name is already used",
                {"fields": [{"name": "name"}]},
            )

    def _new(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        obj = {"id": self._new_id(), "created": CREATED, "labels": {}, **values}
        obj.setdefault("protection", {"delete": False})
        return obj

    def _view(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """The JSON of a stored object (servers and volumes refer to the others by id)."""
        out = dict(obj)
        if kind == "servers":
            firewalls = [
                {"id": f["id"], "status": "applied"}
                for f in self.state["firewalls"].values()
                if any(r.get("server", {}).get("id") == obj["id"] for r in f["applied_to"])
            ]
            pip = self.state["primary_ips"].get(obj["ipv4_id"] or -1)
            out["public_net"] = {
                "ipv4": {
                    "id": pip["id"],
                    "ip": pip["ip"],
                    "blocked": False,
                    "dns_ptr": "static.example",
                }
                if pip
                else None,
                "ipv6": None,
                "floating_ips": [],
                "firewalls": firewalls,
            }
            out["volumes"] = [
                v["id"] for v in self.state["volumes"].values() if v["server"] == obj["id"]
            ]
            del out["ipv4_id"]
        return out

    def _action(self, command: str, resources: list[tuple[int, str]]) -> dict[str, Any]:
        """An action that reports "running" once, then "success" (or the injected error)."""
        failure = self.action_faults.get(command, [])
        error = failure.pop(0) if failure else None
        action = {
            "id": self._new_id(),
            "command": command,
            "status": "running",
            "progress": 0,
            "started": CREATED,
            "finished": None,
            "resources": [{"id": i, "type": t} for i, t in resources],
            "error": None,
            "_outcome": error,
        }
        self.state["actions"][action["id"]] = action
        return _public(action)

    def _poll_action(self, ident: int) -> dict[str, Any]:
        action = self.state["actions"].get(ident)
        if action is None:
            raise ApiError(404, "not_found", f"action with ID '{ident}' not found")
        if action["status"] == "running" and action["progress"] == 0:
            action["progress"] = 50  # polled once while running
        elif action["status"] == "running":
            error = action["_outcome"]
            action.update(progress=100, finished=CREATED)
            if error:
                action.update(status="error", error={"code": error[0], "message": error[1]})
            else:
                action["status"] = "success"
        return _public(action)

    def _delete(self, kind: str, obj: dict[str, Any]) -> tuple[int, Any]:
        if kind == "volumes" and obj["server"] is not None:
            raise ApiError(423, "locked", "volume is attached to a server")
        if kind == "primary_ips" and obj["assignee_id"] is not None:
            raise ApiError(409, "conflict", "primary IP is assigned to a server")
        if kind == "firewalls" and obj["applied_to"]:
            raise ApiError(422, "resource_in_use", "firewall is still applied to resources")
        del self.state[kind][obj["id"]]
        if kind == "servers":
            for volume in self.state["volumes"].values():
                if volume["server"] == obj["id"]:
                    volume["server"] = None
            for pip in self.state["primary_ips"].values():
                if pip["assignee_id"] == obj["id"]:
                    pip["assignee_id"] = None
            for fw in self.state["firewalls"].values():
                fw["applied_to"] = [
                    r for r in fw["applied_to"] if r.get("server", {}).get("id") != obj["id"]
                ]
            return 200, {"action": self._action("delete_server", [(obj["id"], "server")])}
        return 204, None

    # --- creation -------------------------------------------------------------------------------

    def _limit(self, kind: str, limit: int = 10) -> None:
        if len(self.state[kind]) >= limit:
            raise ApiError(403, "resource_limit_exceeded", f"{RESOURCES[kind]} limit exceeded")

    def _create_ssh_keys(self, body: dict[str, Any]) -> dict[str, Any]:
        self._unique_name("ssh_keys", body["name"])
        try:
            blob = base64.b64decode(body["public_key"].split()[1], validate=True)
        except (IndexError, ValueError):
            raise ApiError(
                400,
                "invalid_input",
                "invalid input in field 'public_key'",
                {"fields": [{"name": "public_key", "messages": ["is invalid"]}]},
            ) from None
        digest = hashlib.md5(blob).hexdigest()
        fingerprint = ":".join(digest[i : i + 2] for i in range(0, 32, 2))
        if any(k["fingerprint"] == fingerprint for k in self.state["ssh_keys"].values()):
            raise ApiError(409, "uniqueness_error", "SSH key with the same fingerprint exists")
        key = self._new(
            "ssh_keys",
            {
                "name": body["name"],
                "public_key": body["public_key"],
                "fingerprint": fingerprint,
                "labels": body.get("labels", {}),
            },
        )
        self.state["ssh_keys"][key["id"]] = key
        return {"ssh_key": key}

    def _rules(self, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "direction": r["direction"],
                "protocol": r["protocol"],
                "port": r.get("port"),
                "source_ips": r.get("source_ips", []),
                "destination_ips": r.get("destination_ips", []),
                "description": r.get("description"),
            }
            for r in rules
        ]

    def _create_firewalls(self, body: dict[str, Any]) -> dict[str, Any]:
        self._unique_name("firewalls", body["name"])
        fw = self._new(
            "firewalls",
            {
                "name": body["name"],
                "labels": body.get("labels", {}),
                "rules": self._rules(body.get("rules", [])),
                "applied_to": [],
            },
        )
        self.state["firewalls"][fw["id"]] = fw
        return {"firewall": fw, "actions": [self._action("set_firewall_rules", [])]}

    def _firewalls_set_rules(self, fw: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        fw["rules"] = self._rules(body["rules"])
        return {"actions": [self._action("set_firewall_rules", [(fw["id"], "firewall")])]}

    def _firewalls_apply_to_resources(
        self, fw: dict[str, Any], body: dict[str, Any]
    ) -> dict[str, Any]:
        for resource in body["apply_to"]:
            server = self._get("servers", resource["server"]["id"])
            fw["applied_to"].append({"type": "server", "server": {"id": server["id"]}})
        return {"actions": [self._action("apply_firewall", [(fw["id"], "firewall")])]}

    def _firewalls_remove_from_resources(
        self, fw: dict[str, Any], body: dict[str, Any]
    ) -> dict[str, Any]:
        gone = {r["server"]["id"] for r in body["remove_from"]}
        fw["applied_to"] = [r for r in fw["applied_to"] if r["server"]["id"] not in gone]
        return {"actions": [self._action("remove_firewall", [(fw["id"], "firewall")])]}

    def _location(self, name: str | None, field_name: str = "location") -> dict[str, Any]:
        if name not in LOCATIONS:
            raise ApiError(
                400,
                "invalid_input",
                f"invalid input in field '{field_name}'",
                {"fields": [{"name": field_name, "messages": ["location not found"]}]},
            )
        return LOCATIONS[name]

    def _create_primary_ips(self, body: dict[str, Any]) -> dict[str, Any]:
        self._unique_name("primary_ips", body["name"])
        self._limit("primary_ips")
        ip = self.next_ipv4() if self.next_ipv4 else self._new_ip()
        pip = self._new(
            "primary_ips",
            {
                "name": body["name"],
                "type": body["type"],
                "ip": ip,
                "dns_ptr": [{"ip": ip, "dns_ptr": "static.example"}],
                "location": self._location(body.get("location")),
                "blocked": False,
                "labels": body.get("labels", {}),
                "assignee_id": body.get("assignee_id"),
                "assignee_type": "server",
                "auto_delete": body.get("auto_delete", False),
            },
        )
        self.state["primary_ips"][pip["id"]] = pip
        return {"primary_ip": pip, "action": None}

    def _create_servers(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["server_type"] not in SERVER_TYPES:
            raise ApiError(
                400,
                "invalid_input",
                "invalid input in field 'server_type'",
                {"fields": [{"name": "server_type", "messages": ["server type not found"]}]},
            )
        location = self._location(body.get("location"))
        self._unique_name("servers", body["name"])
        self._limit("servers", 5)
        ipv4 = body.get("public_net", {}).get("ipv4")
        if ipv4 is not None:
            pip = self._get("primary_ips", ipv4)
            if pip["assignee_id"] is not None:
                raise ApiError(409, "conflict", "primary IP is already assigned")
        server = self._new(
            "servers",
            {
                "name": body["name"],
                "status": "running",
                "server_type": SERVER_TYPES[body["server_type"]],
                "image": IMAGES[body["image"]],
                "location": location,
                "labels": body.get("labels", {}),
                "ssh_keys": body.get("ssh_keys", []),
                "iso": None,
                "rescue_enabled": False,
                "locked": False,
                "backup_window": None,
                "outgoing_traffic": 0,
                "ingoing_traffic": 0,
                "included_traffic": 21990232555520,
                "primary_disk_size": SERVER_TYPES[body["server_type"]]["disk"],
                "private_net": [],
                "load_balancers": [],
                "placement_group": None,
                "protection": {"delete": False, "rebuild": False},
                "ipv4_id": ipv4,
                "rebuilds": 0,
            },
        )
        self.state["servers"][server["id"]] = server
        if ipv4 is not None:
            self.state["primary_ips"][ipv4]["assignee_id"] = server["id"]
        for ref in body.get("firewalls", []):
            self._get("firewalls", ref["firewall"])["applied_to"].append(
                {"type": "server", "server": {"id": server["id"]}}
            )
        for volume_id in body.get("volumes", []):
            self._get("volumes", volume_id)["server"] = server["id"]
        return {
            "server": self._view("servers", server),
            "action": self._action("create_server", [(server["id"], "server")]),
            "next_actions": [],
            "root_password": None,
        }

    def _servers_rebuild(self, server: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        if body["image"] not in IMAGES:
            raise ApiError(404, "not_found", "image not found")
        server["image"] = IMAGES[body["image"]]
        server["rebuilds"] += 1
        return {
            "action": self._action("rebuild_server", [(server["id"], "server")]),
            "root_password": None,
        }

    def _create_volumes(self, body: dict[str, Any]) -> dict[str, Any]:
        self._unique_name("volumes", body["name"])
        if not 10 <= body["size"] <= 10240:
            raise ApiError(400, "invalid_input", "invalid input in field 'size'")
        server_id = body.get("server")
        location = (
            self._get("servers", server_id)["location"]
            if server_id
            else self._location(body.get("location"))
        )
        volume = self._new(
            "volumes",
            {
                "name": body["name"],
                "size": body["size"],
                "server": server_id,
                "location": location,
                "linux_device": "",
                "format": body.get("format"),
                "labels": body.get("labels", {}),
                "status": "available",
            },
        )
        if self.next_volume_id is not None:
            volume["id"], self.next_volume_id = self.next_volume_id, None
        volume["linux_device"] = f"/dev/disk/by-id/scsi-0HC_Volume_{volume['id']}"
        self.state["volumes"][volume["id"]] = volume
        return {
            "volume": volume,
            "action": self._action("create_volume", [(volume["id"], "volume")]),
            "next_actions": [self._action("attach_volume", [(volume["id"], "volume")])]
            if server_id
            else [],
        }

    def _volumes_resize(self, volume: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        if body["size"] < volume["size"]:
            raise ApiError(
                400, "invalid_input", "volume size can only be increased", {"fields": []}
            )
        volume["size"] = body["size"]
        return {"action": self._action("resize_volume", [(volume["id"], "volume")])}

    def _volumes_attach(self, volume: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        server = self._get("servers", body["server"])
        if server["location"] != volume["location"]:
            raise ApiError(422, "invalid_input", "volume and server are in different locations")
        volume["server"] = server["id"]
        return {"action": self._action("attach_volume", [(volume["id"], "volume")])}

    def _volumes_detach(self, volume: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        volume["server"] = None
        return {"action": self._action("detach_volume", [(volume["id"], "volume")])}


def _id(obj: dict[str, Any]) -> int:
    return int(obj["id"])


def _public(action: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in action.items() if not k.startswith("_")}
