"""The Hetzner Cloud API as the provisioning operations use it: one client, the appliance's
resources found by name and label, and every failure turned into one line that names the fix.

The token comes from HCLOUD_TOKEN only (never inventory data, a command line or a log);
HCLOUD_ENDPOINT points the client at another endpoint speaking the same JSON (the tests' fake).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from hcloud import APIException, Client
from hcloud.actions import ActionFailedException, ActionTimeoutException, BoundAction
from pyinfra.api.exceptions import PyinfraError

DEFAULT_ENDPOINT = "https://api.hetzner.cloud/v1"
LABEL = "appliance"

# Which inventory value a field Hetzner rejects comes from.
FIELD_SETTINGS = {
    "server_type": "hcloud_server_type",
    "location": "hcloud_location",
    "image": "hcloud_image",
    "size": "hcloud_volume_size_gb",
    "public_key": "hcloud_ssh_public_key",
    "source_ips": "admin_ssh_addresses",
}


class CloudError(PyinfraError):
    """A Hetzner Cloud request failed or a change was refused; the message names the fix."""


class _RateLimited(Exception):
    def __init__(self, wait_s: float):
        super().__init__(wait_s)
        self.wait_s = wait_s


@dataclass(frozen=True)
class Names:
    """What the appliance's resources are called; every one carries the label appliance=<name>."""

    appliance: str
    ssh_key: str

    @property
    def server(self) -> str:
        return self.appliance

    @property
    def firewall(self) -> str:
        return self.appliance

    @property
    def volume(self) -> str:
        return f"{self.appliance}-data"

    @property
    def ipv4(self) -> str:
        return f"{self.appliance}-ipv4"

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: self.appliance}

    @property
    def selector(self) -> str:
        return f"{LABEL}={self.appliance}"


def token_from_environment() -> str:
    token = os.environ.get("HCLOUD_TOKEN", "").strip()
    if not token:
        raise CloudError(
            "HCLOUD_TOKEN is not set: export a Read & Write API token of the Hetzner Cloud "
            "project (Hetzner Console → Security → API tokens)"
        )
    return token


class Cloud:
    """One Hetzner Cloud client; `doing(what)` turns its failures into a CloudError."""

    def __init__(
        self,
        token: str,
        *,
        endpoint: str | None = None,
        poll_interval_s: float = 1.0,
        rate_limit_wait_s: float = 60.0,
        application: str = "bluesky-appliance",
    ):
        self.endpoint = endpoint or os.environ.get("HCLOUD_ENDPOINT") or DEFAULT_ENDPOINT
        self.client = Client(
            token=token,
            api_endpoint=self.endpoint,
            application_name=application,
            poll_interval=poll_interval_s,
            poll_max_retries=int(max(120, 600 / poll_interval_s)),
            timeout=30,
        )
        self.rate_limit_wait_s = rate_limit_wait_s
        self._retry_after: float | None = None
        # The library retries a 429 with its own backoff and drops the response; keep the
        # rate-limit headers of the last answer so a retry waits as long as Hetzner says, and a
        # wait longer than we accept stops the run with the time to come back.
        base = self.client._client
        base._session.hooks["response"].append(self._note_rate_limit)
        default_interval = base._retry_interval_func

        def interval(retries: int) -> float:
            wait = self._retry_after
            if wait is None:
                return default_interval(retries)
            if wait > self.rate_limit_wait_s:
                raise _RateLimited(wait)
            return wait

        base._retry_interval_func = interval

    @classmethod
    def from_environment(
        cls, *, poll_interval_s: float = 1.0, rate_limit_wait_s: float = 60.0
    ) -> Cloud:
        return cls(
            token_from_environment(),
            poll_interval_s=poll_interval_s,
            rate_limit_wait_s=rate_limit_wait_s,
        )

    def _note_rate_limit(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._retry_after = _retry_after(response) if response.status_code == 429 else None

    @contextlib.contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """Run API calls for `what` ("create the server x"); failures become one clear line."""
        try:
            yield
        except _RateLimited as exc:
            raise CloudError(
                f"Hetzner API rate limit reached while trying to {what}: the project's requests "
                f"are used up for now; run again in {exc.wait_s:.0f} s"
            ) from None
        except APIException as exc:
            raise CloudError(explain(what, exc, self._retry_after)) from None
        except ActionFailedException as exc:
            error: dict[str, Any] = dict(exc.action.error or {})
            raise CloudError(
                f"Hetzner could not {what}: its action {exc.action.command} failed "
                f"({error.get('code', 'error')}: {error.get('message', 'no message')}); "
                "run again, and if it fails again ask Hetzner support with that action's id "
                f"{exc.action.id}"
            ) from None
        except ActionTimeoutException as exc:
            raise CloudError(
                f"Hetzner did not finish {exc.action.command} (action {exc.action.id}) in time "
                f"while trying to {what}: check the project in the Hetzner Console, then run again"
            ) from None
        except requests.RequestException as exc:
            raise CloudError(
                f"cannot reach the Hetzner API at {self.endpoint} while trying to {what}: "
                f"{type(exc).__name__}; check the network (or HCLOUD_ENDPOINT)"
            ) from None

    def wait(self, *actions: BoundAction | None) -> None:
        """Wait until every action finished; a failed one raises ActionFailedException."""
        for action in actions:
            if action is not None:
                action.wait_until_finished()

    # --- the appliance's resources, found by name --------------------------------------------

    def find(self, kind: str, name: str) -> Any:
        """The resource of `kind` (servers, volumes, ...) called `name`, or None."""
        return getattr(self.client, kind).get_by_name(name)

    def operator_key(self, names: Names, public_key: str) -> Any:
        """The operator's key in the project: by its name, else by its fingerprint (a key
        uploaded earlier under another name is used as it is), or None."""
        return self.find("ssh_keys", names.ssh_key) or self.client.ssh_keys.get_by_fingerprint(
            fingerprint(public_key)
        )

    def labelled(self, names: Names) -> dict[str, list[Any]]:
        """Every resource carrying the appliance's label, by kind."""
        return {
            kind: getattr(self.client, kind).get_all(label_selector=names.selector)
            for kind in ("servers", "volumes", "firewalls", "primary_ips", "ssh_keys")
        }

    def existing(self, names: Names) -> str:
        """One line saying which of the appliance's resources exist now."""
        try:
            with self.doing("list the appliance's resources"):
                found = self.labelled(names)
        except CloudError as exc:
            return f"could not list what exists ({exc})"
        parts = [
            f"{kind.rstrip('s').replace('_', ' ')} {item.name} (id {item.id})"
            for kind, items in found.items()
            for item in items
        ]
        return "exists now: " + (
            ", ".join(parts) if parts else "nothing labelled " + names.selector
        )


def explain(what: str, exc: APIException, retry_after: float | None = None) -> str:
    """One line for an API error: what failed, Hetzner's words, and what to fix."""
    code, message = exc.code, exc.message
    head = f"Hetzner refused to {what}: {message} ({code})"
    if code == "unauthorized" or code == 401:
        return (
            f"the Hetzner API did not accept the token while trying to {what} ({code}): set "
            "HCLOUD_TOKEN to a valid Read & Write API token of the project"
        )
    if code in ("forbidden", "token_readonly"):
        return f"{head}: the token is not allowed to; give HCLOUD_TOKEN a Read & Write token"
    if code == "resource_limit_exceeded":
        return (
            f"{head}: the project's resource limit is reached; delete what it no longer needs "
            "or ask Hetzner to raise the limit (Hetzner Console → Limits), then run again"
        )
    if code == "rate_limit_exceeded" or code == 429:
        when = f"in {retry_after:.0f} s" if retry_after is not None else "later"
        return f"Hetzner API rate limit reached while trying to {what}: run again {when}"
    if code == "resource_unavailable":
        return (
            f"{head}: pick another hcloud_location or hcloud_server_type in "
            "inventory/group_data/all.py, or try again later"
        )
    if code == "invalid_input":
        fields = [f.get("name", "") for f in (exc.details or {}).get("fields", [])]
        settings = [FIELD_SETTINGS.get(f, f) for f in fields if f]
        if settings:
            return f"{head}: check {', '.join(settings)} in inventory/group_data/all.py"
        return f"{head}: check the hcloud_* values in inventory/group_data/all.py"
    if code == "uniqueness_error":
        return f"{head}: a resource with that name or key exists already in the project"
    if code in ("locked", "conflict"):
        return f"{head}: another action is running on it; wait a minute and run again"
    if code in ("service_error", "maintenance", "unavailable", 502, 503, 504):
        return f"{head}: a problem on Hetzner's side; run again later"
    return head


def fingerprint(public_key: str) -> str:
    """The MD5 fingerprint Hetzner lists an SSH key by (aa:bb:...)."""
    digest = hashlib.md5(base64.b64decode(public_key.split()[1])).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _retry_after(response: requests.Response) -> float | None:
    """How long Hetzner asks us to wait: Retry-After (seconds or a date) or RateLimit-Reset."""
    value = response.headers.get("Retry-After")
    if value:
        if value.strip().isdigit():
            return float(value)
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    reset = response.headers.get("RateLimit-Reset")
    if reset and reset.strip().isdigit():
        return max(0.0, float(reset) - time.time())
    return None
