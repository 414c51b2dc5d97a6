"""Render the configuration files docker-compose's services read, from the same templates the
pyinfra roles render: appliance/templates/redis.conf (the appliance package's own) and
monitoring/alertmanager.yml (Jinja2), into the shared `config` volume. Runs once, as the
`config` service, before Redis and Alertmanager start.

Inputs are environment variables (from .env): APPLIANCE_REDIS_PASSWORD, APPLIANCE_REDIS_MAXMEMORY,
ALERT_RECEIVER (none | webhook | email), ALERT_WEBHOOK_URL, ALERT_EMAIL_TO, ALERT_EMAIL_FROM,
ALERT_EMAIL_SMARTHOST, ALERT_EMAIL_USERNAME, ALERT_CREDENTIAL (the SMTP password or the webhook's
bearer token: written to a file Alertmanager reads, never into its configuration).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jinja2

from appliance.config import ConfigError, load_settings
from appliance.redis_server import render_template

CONFIG = Path(os.environ.get("CONFIG_DIR", "/config"))
MONITORING = Path(os.environ.get("MONITORING_DIR", "/monitoring"))


def write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def alertmanager_values(env: dict[str, str], credential_file: Path) -> dict[str, object]:
    receiver = env.get("ALERT_RECEIVER", "none") or "none"
    if receiver not in ("none", "webhook", "email"):
        raise SystemExit(f"ALERT_RECEIVER={receiver!r}: use none, webhook or email")
    values: dict[str, object] = {"alert_receiver": receiver}
    required = {
        "webhook": ["ALERT_WEBHOOK_URL"],
        "email": ["ALERT_EMAIL_TO", "ALERT_EMAIL_FROM", "ALERT_EMAIL_SMARTHOST"],
    }.get(receiver, [])
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise SystemExit(f"ALERT_RECEIVER={receiver} needs {', '.join(missing)} in .env")
    for name in [*required, "ALERT_EMAIL_USERNAME"]:
        if env.get(name):
            values[name.lower()] = env[name]
    if env.get("ALERT_CREDENTIAL"):
        key = "alert_webhook_token_file" if receiver == "webhook" else "alert_email_password_file"
        values[key] = str(credential_file)
    return values


def main() -> None:
    env = dict(os.environ)
    try:
        settings = load_settings({k: v for k, v in env.items() if k.startswith("APPLIANCE_")})
    except ConfigError as exc:
        raise SystemExit(f"render_config: {exc}") from None
    if not settings.redis_password:
        raise SystemExit("render_config: set APPLIANCE_REDIS_PASSWORD in .env")
    redis_conf = render_template(
        "redis.conf",
        {
            "bind": "0.0.0.0 -::",  # the compose network only: no port of Redis is published
            "port": settings.redis_port,
            "password": settings.redis_password,
            "dir": "/data",
            "maxmemory": settings.redis_maxmemory,
        },
    )
    # Redis runs as another user in its own image; the volume is private to the stack.
    write(CONFIG / "redis" / "redis.conf", redis_conf, 0o644)
    credential = CONFIG / "alertmanager" / "credential"
    if env.get("ALERT_CREDENTIAL"):
        write(credential, env["ALERT_CREDENTIAL"] + "\n", 0o644)
    template = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(MONITORING)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    ).get_template("alertmanager.yml")
    text = template.render(**alertmanager_values(env, credential))
    write(CONFIG / "alertmanager" / "alertmanager.yml", text, 0o644)
    print("render_config: wrote redis.conf and alertmanager.yml", file=sys.stderr)


if __name__ == "__main__":
    main()
