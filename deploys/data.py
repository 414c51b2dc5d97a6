"""The inventory's data for one host, validated into one typed object before any operation runs.

`inventory/group_data/all.py` holds every tunable with its default; a host or group may override
any of them. A bad value stops the deploy with the name of the value and what is wrong, before
anything on the host is touched.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from appliance import config as appliance_config

# Secrets the site keeps on the host under SECRETS_DIR, one file each. A value comes from the
# operator's environment (DEPLOY_SECRET_<NAME>) or a git-ignored file inventory/secrets/<name>;
# when neither has it, the one already on the host is kept, and failing that one is generated.
# The identity worker's /health, /ready, /metrics (loopback; Prometheus scrapes it).
IDENTITY_PORT = 9103
SECRET_NAMES = ("redis_password", "api_cursor_secret", "grafana_admin_password")
# Given only by the operator, never generated: the Alertmanager receiver's credential.
OPERATOR_SECRETS = ("alert_credential",)
SECRETS_DIR = "/etc/appliance/secrets"
SECRET_ENV_PREFIX = "DEPLOY_SECRET_"
SECRETS_FILE_DIR = Path(__file__).resolve().parent.parent / "inventory" / "secrets"

_SIZE = re.compile(r"^\d+(?:[kmg]b?)?$", re.IGNORECASE)
_RETENTION = re.compile(r"^\d+(?:ms|s|m|h|d|w|y)$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*$"
)
_DEVICE = re.compile(r"^/dev/[A-Za-z0-9._:/-]+$")
_UNSAFE_IN_SECRETS = frozenset("'\"\\$` \t\r\n")
_ABS_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")
_Data = TypeVar("_Data", bound=msgspec.Struct)
_SSH_KEY_TYPE = re.compile(r"^(ssh-(ed25519|rsa)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+)$")

# Settings the site sets itself from the values above; an operator override of one is refused
# so that the two never disagree.
SITE_OWNED_SETTINGS = frozenset(
    {
        "APPLIANCE_IDENTITY_HOST",
        "APPLIANCE_IDENTITY_PORT",
        "APPLIANCE_DATA_DIR",
        "APPLIANCE_REDIS_HOST",
        "APPLIANCE_REDIS_PORT",
        "APPLIANCE_REDIS_PASSWORD",
        "APPLIANCE_REDIS_DIR",
        "APPLIANCE_REDIS_MAXMEMORY",
        "APPLIANCE_API_HOST",
        "APPLIANCE_API_PORT",
        "APPLIANCE_API_WORKERS",
        "APPLIANCE_API_CURSOR_SECRET",
        "APPLIANCE_INGEST_HOST",
        "APPLIANCE_INGEST_PORT",
        "APPLIANCE_BATCH_HOST",
        "APPLIANCE_BATCH_PORT",
        "APPLIANCE_JETSTREAM_URLS",
        "APPLIANCE_LOG_FORMAT",
    }
)


class InventoryError(ValueError):
    """An inventory value is missing or malformed; the message names it."""


class AlertReceiver(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where Alertmanager sends alerts. A credential (the SMTP password, or a bearer token for
    the webhook) is the secret `alert_credential`, never inventory data."""

    kind: Literal["none", "webhook", "email"] = "none"
    webhook_url: str = ""
    email_to: str = ""
    email_from: str = ""
    email_smarthost: str = ""
    email_username: str = ""
    email_require_tls: bool = True

    def template_variables(self) -> dict[str, Any]:
        """The variables of monitoring/alertmanager.yml for this receiver."""
        out: dict[str, Any] = {"alert_receiver": self.kind}
        if self.kind == "webhook":
            out["alert_webhook_url"] = self.webhook_url
        elif self.kind == "email":
            out.update(
                alert_email_to=self.email_to,
                alert_email_from=self.email_from,
                alert_email_smarthost=self.email_smarthost,
                alert_email_require_tls=self.email_require_tls,
            )
            if self.email_username:
                out["alert_email_username"] = self.email_username
        return out


class SiteData(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every tunable of the site deploy. Defaults live in inventory/group_data/all.py."""

    appliance_name: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9-]{0,39}$")]
    data_root: str
    volume_device: str
    redis_port: Annotated[int, Meta(ge=1, le=65535)]
    redis_maxmemory: str
    api_port: Annotated[int, Meta(ge=1, le=65535)]
    api_workers: Annotated[int, Meta(ge=1, le=64)]
    ingest_port: Annotated[int, Meta(ge=1, le=65535)]
    batch_port: Annotated[int, Meta(ge=1, le=65535)]
    domain: str
    acme_email: str
    site_addresses: tuple[str, ...]
    admin_ssh_addresses: tuple[str, ...]
    ssh_port: Annotated[int, Meta(ge=1, le=65535)]
    prometheus_retention: str
    jetstream_urls: Annotated[tuple[str, ...], Meta(min_length=1)]
    appliance_settings: dict[str, str]
    alert_receiver: AlertReceiver
    grafana_enabled: bool
    grafana_apt_key_fingerprint: Annotated[str, Meta(pattern=r"^[0-9A-F]{40}$")]
    wheelhouse: str
    keep_releases: Annotated[int, Meta(ge=1, le=20)]
    apt_cache_time: Annotated[int, Meta(ge=0)]
    max_request_body: str

    def __post_init__(self) -> None:
        self._check_paths_and_sizes()
        self._check_addresses()
        self._check_ports()
        self._check_appliance()
        self._check_alert_receiver()

    def _check_paths_and_sizes(self) -> None:
        """The data root, the volume device, and the sizes and durations written as text."""
        _check(
            _ABS_PATH.match(self.data_root) and self.data_root != "/",
            "data_root",
            f"{self.data_root!r} must be an absolute path below /",
        )
        _check(
            not self.volume_device or _DEVICE.match(self.volume_device),
            "volume_device",
            f"{self.volume_device!r} must be a /dev/... path (Hetzner: /dev/disk/by-id/scsi-0HC_Volume_<id>) or empty",
        )
        _check(
            _SIZE.match(self.redis_maxmemory),
            "redis_maxmemory",
            f"{self.redis_maxmemory!r} is not a size like 2gb or 512mb",
        )
        _check(
            _SIZE.match(self.max_request_body),
            "max_request_body",
            f"{self.max_request_body!r} is not a size like 1MB",
        )
        _check(
            _RETENTION.match(self.prometheus_retention),
            "prometheus_retention",
            f"{self.prometheus_retention!r} is not a duration like 30d",
        )

    def _check_addresses(self) -> None:
        """The domain, the site's addresses and who may SSH in."""
        _check(
            not self.domain or _HOSTNAME.match(self.domain),
            "domain",
            f"{self.domain!r} is not a DNS name",
        )
        _check(
            not self.domain or "@" in self.acme_email,
            "acme_email",
            "a domain gets a Let's Encrypt certificate: give the e-mail ACME registers with",
        )
        for name in self.site_addresses:
            _check(
                _is_ip(name) or _HOSTNAME.match(name),
                "site_addresses",
                f"{name!r} is not an IP address or DNS name",
            )
        _check(
            self.admin_ssh_addresses,
            "admin_ssh_addresses",
            'is empty: list who may SSH in (e.g. your own address, "198.51.100.7/32"); '
            "the firewall admits nobody else",
        )
        _check_networks("admin_ssh_addresses", self.admin_ssh_addresses)

    def _check_ports(self) -> None:
        """The services' ports: distinct, and clear of the ports other parts of the site use."""
        ports = {
            "redis_port": self.redis_port,
            "api_port": self.api_port,
            "ingest_port": self.ingest_port,
            "batch_port": self.batch_port,
        }
        _check(
            len(set(ports.values())) == len(ports),
            "ports",
            f"redis, API, ingester and batcher need distinct ports: {ports}",
        )
        taken = {22, 80, 443, 3000, 9090, 9093, 9094, 9100, 9121, IDENTITY_PORT} - {self.ssh_port}
        clash = {k: v for k, v in ports.items() if v in taken}
        _check(
            not clash, "ports", f"{clash} clash with SSH, Caddy, Grafana or the monitoring ports"
        )

    def _check_appliance(self) -> None:
        """The Jetstream URLs and the appliance's own settings, as the appliance would load them."""
        for url in self.jetstream_urls:
            _check(
                url.startswith(("ws://", "wss://")),
                "jetstream_urls",
                f"{url!r} is not a ws:// or wss:// URL",
            )
        owned = sorted(SITE_OWNED_SETTINGS & set(self.appliance_settings))
        _check(
            not owned,
            "appliance_settings",
            f"{', '.join(owned)} are set by the site from other inventory values; set those instead",
        )
        try:
            appliance_config.load_settings(self.appliance_settings)
        except appliance_config.ConfigError as exc:
            raise InventoryError(f"appliance_settings: {exc}") from None

    def _check_alert_receiver(self) -> None:
        """What the chosen alert receiver needs."""
        receiver = self.alert_receiver
        if receiver.kind == "webhook":
            _check(
                receiver.webhook_url.startswith(("http://", "https://")),
                "alert_receiver.webhook_url",
                "must be an http(s) URL (a token goes in the "
                "secret alert_credential, sent as a bearer token)",
            )
        if receiver.kind == "email":
            for field in ("email_to", "email_from", "email_smarthost"):
                _check(
                    getattr(receiver, field),
                    f"alert_receiver.{field}",
                    "is required for e-mail alerts",
                )

    @property
    def volume_mount(self) -> str:
        """Where the volume is mounted: the data root itself."""
        return self.data_root

    @property
    def parquet_dir(self) -> str:
        return f"{self.data_root}/data"

    @property
    def redis_dir(self) -> str:
        return f"{self.data_root}/redis"

    def appliance_environment(self) -> dict[str, str]:
        """The APPLIANCE_* settings of the services (no secrets: those go in their own file)."""
        env = dict(sorted(self.appliance_settings.items()))
        env.update(
            {
                "APPLIANCE_DATA_DIR": self.parquet_dir,
                "APPLIANCE_REDIS_HOST": "127.0.0.1",
                "APPLIANCE_REDIS_PORT": str(self.redis_port),
                "APPLIANCE_REDIS_DIR": self.redis_dir,
                "APPLIANCE_REDIS_MAXMEMORY": self.redis_maxmemory,
                "APPLIANCE_API_HOST": "127.0.0.1",
                "APPLIANCE_API_PORT": str(self.api_port),
                "APPLIANCE_API_WORKERS": str(self.api_workers),
                "APPLIANCE_INGEST_HOST": "127.0.0.1",
                "APPLIANCE_INGEST_PORT": str(self.ingest_port),
                "APPLIANCE_BATCH_HOST": "127.0.0.1",
                "APPLIANCE_BATCH_PORT": str(self.batch_port),
                "APPLIANCE_IDENTITY_HOST": "127.0.0.1",
                "APPLIANCE_IDENTITY_PORT": str(IDENTITY_PORT),
                "APPLIANCE_JETSTREAM_URLS": ",".join(self.jetstream_urls),
                "APPLIANCE_LOG_FORMAT": "json",
            }
        )
        return env


class ProvisionData(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every tunable of the Hetzner Cloud provisioning. Defaults: inventory/group_data/all.py."""

    appliance_name: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9-]{0,39}$")]
    hcloud_server_type: Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,30}$")]
    hcloud_location: Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,20}$")]
    hcloud_image: Annotated[str, Meta(pattern=r"^[a-z0-9.-]{1,60}$")]
    hcloud_volume_size_gb: Annotated[int, Meta(ge=10, le=10240)]
    hcloud_ssh_public_key: str
    hcloud_ssh_key_name: str
    hcloud_ipv6: bool
    hcloud_poll_interval_s: Annotated[float, Meta(gt=0, le=60)]
    hcloud_rate_limit_wait_s: Annotated[int, Meta(ge=0, le=3600)]
    rebuild_ssh_wait_s: Annotated[int, Meta(ge=0, le=3600)]
    admin_ssh_addresses: tuple[str, ...]
    ssh_port: Annotated[int, Meta(ge=1, le=65535)]

    def __post_init__(self) -> None:
        _check(
            self.admin_ssh_addresses,
            "admin_ssh_addresses",
            'is empty: list who may SSH in (e.g. your own address, "198.51.100.7/32"); '
            "the Hetzner firewall admits nobody else",
        )
        _check(
            not self.hcloud_ssh_key_name or _HOSTNAME.match(self.hcloud_ssh_key_name),
            "hcloud_ssh_key_name",
            f"{self.hcloud_ssh_key_name!r} must be lower-case letters, digits, dots and dashes",
        )
        _check_networks("admin_ssh_addresses", self.admin_ssh_addresses)

    @property
    def ssh_key_name(self) -> str:
        return self.hcloud_ssh_key_name or f"{self.appliance_name}-admin"

    def public_key(self) -> str:
        """The operator's public key (one `type base64 [comment]` line) from its file."""
        path = Path(self.hcloud_ssh_public_key).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise InventoryError(
                f"hcloud_ssh_public_key: cannot read {path} ({exc.strerror}): point it at your "
                "public key, e.g. ~/.ssh/id_ed25519.pub (make one with ssh-keygen -t ed25519)"
            ) from None
        parts = text.split()
        _check(
            len(parts) >= 2
            and _SSH_KEY_TYPE.match(parts[0])
            and len(text.splitlines()) == 1
            and "PRIVATE" not in text,
            "hcloud_ssh_public_key",
            f"{path} is not one OpenSSH public key line (ssh-ed25519 AAAA... comment)",
        )
        return text


def _check(ok: object, name: str, message: str) -> None:
    if not ok:
        raise InventoryError(f"{name}: {message}")


def _check_networks(name: str, values: tuple[str, ...]) -> None:
    for cidr in values:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InventoryError(f"{name}: {cidr!r} is not an IP address or network") from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def site_data(data: Any) -> SiteData:
    """Validate a pyinfra host's data (its `host.data`) into SiteData."""
    return _validated(SiteData, data)


def provision_data(data: Any) -> ProvisionData:
    """Validate the provisioning run's data (`host.data` of @local) into ProvisionData."""
    return _validated(ProvisionData, data)


def _validated(kind: type[_Data], data: Any) -> _Data:
    fields = {f.name for f in msgspec.structs.fields(kind)}
    values = {name: data.get(name) for name in fields if data.get(name) is not None}
    missing = sorted(fields - set(values))
    if missing:
        raise InventoryError(
            f"missing inventory value(s): {', '.join(missing)} (defaults are in "
            "inventory/group_data/all.py: is the inventory file inside inventory/?)"
        )
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:
        text, _, path = str(exc).partition(" - at `$.")
        where = path.rstrip("`") or "inventory"
        raise InventoryError(f"{where}: {text}") from None


def supplied_secrets(
    environ: Mapping[str, str] | None = None, directory: Path = SECRETS_FILE_DIR
) -> dict[str, str]:
    """Secrets the operator supplies: DEPLOY_SECRET_<NAME> variables, else inventory/secrets/<name>."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name in SECRET_NAMES + OPERATOR_SECRETS:
        value = env.get(SECRET_ENV_PREFIX + name.upper())
        path = directory / name
        if value is None and path.is_file():
            value = path.read_text().strip()
        if value is not None:
            if not value or len(value) > 4096 or set(value) & _UNSAFE_IN_SECRETS:
                raise InventoryError(
                    f"secret {name}: must be one non-empty line of at most 4096 characters "
                    "without quotes, backslashes, $, backticks or whitespace"
                )
            out[name] = value
    return out
