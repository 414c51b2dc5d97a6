"""Prometheus, the node and Redis exporters and Alertmanager from Debian, all on loopback, with
the repository's one copy of the scrape configuration, rules and Alertmanager template
(monitoring/ at the top of the repository, shared with docker-compose)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyinfra.api import deploy
from pyinfra.operations import apt, files, server, systemd

from roles.ops import beside, render, secret_file

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
PACKAGES = [
    "prometheus",
    "prometheus-node-exporter",
    "prometheus-redis-exporter",
    "prometheus-alertmanager",
]
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
NODE_EXPORTER_PORT = 9100
REDIS_EXPORTER_PORT = 9121
ETC = "/etc/prometheus"
ALERT_CREDENTIAL = f"{ETC}/alert_credential"


def scrape_targets(
    *, ingest_port: int, batch_port: int, api_port: int, identity_port: int
) -> dict[str, int]:
    """Each scrape job of monitoring/prometheus.yml and the loopback port it scrapes."""
    return {
        "ingester": ingest_port,
        "batcher": batch_port,
        "api": api_port,
        "identity": identity_port,
        "redis": REDIS_EXPORTER_PORT,
        "node": NODE_EXPORTER_PORT,
        "prometheus": PROMETHEUS_PORT,
        "alertmanager": ALERTMANAGER_PORT,
    }


@deploy("Set up monitoring")
def monitoring(
    *,
    instance: str,
    targets: dict[str, int],
    retention: str,
    redis_port: int,
    redis_password: str,
    alertmanager: dict[str, Any],
    alert_credential: str | None,
) -> None:
    """Prometheus scraping `targets` (job -> loopback port) under the name `instance`;
    `alertmanager` holds the template variables of monitoring/alertmanager.yml."""
    _prometheus(instance=instance, targets=targets, retention=retention)
    _exporters(redis_port=redis_port, redis_password=redis_password)
    _alertmanager(alertmanager=alertmanager, alert_credential=alert_credential)


def _prometheus(*, instance: str, targets: dict[str, int], retention: str) -> None:
    """The packages, then Prometheus: its configuration, rules, targets and flags."""
    apt.packages(
        name="Install Prometheus, its exporters and Alertmanager",
        packages=PACKAGES,
        no_recommends=True,
    )
    config = files.put(
        name="Install the scrape configuration",
        src=str(MONITORING / "prometheus.yml"),
        dest=f"{ETC}/prometheus.yml",
        mode="644",
    )
    rules = files.sync(
        name="Install the recording and alert rules",
        src=str(MONITORING / "rules"),
        dest=f"{ETC}/rules",
        mode="644",
        dir_mode="755",
        delete=True,
    )
    for job, port in sorted(targets.items()):
        # Prometheus re-reads file_sd files by itself: no reload needed.
        files.template(
            name=f"Point the {job} job at 127.0.0.1:{port}",
            src=beside(__file__, "targets.yml.j2"),
            dest=f"{ETC}/targets/{job}.yml",
            mode="644",
            address=f"127.0.0.1:{port}",
            instance=instance,
        )
    flags = files.template(
        name=f"Listen on loopback only, keep {retention} of history",
        src=beside(__file__, "default.j2"),
        dest="/etc/default/prometheus",
        mode="644",
        args=[
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
            f"--storage.tsdb.retention.time={retention}",
        ],
        environment={},
    )
    server.shell(
        name="Check the Prometheus configuration and rules",
        commands=[f"promtool check config {ETC}/prometheus.yml"],
        _if=lambda: config.did_change() or rules.did_change(),
    )
    systemd.service(
        name="Run Prometheus: restarted when its flags changed, reloaded when its rules did",
        service="prometheus",
        running=True,
        enabled=True,
        restarted=flags.will_change,
        reloaded=(config.will_change or rules.will_change) and not flags.will_change,
    )


def _exporters(*, redis_port: int, redis_password: str) -> None:
    """The node and Redis exporters, on loopback."""
    node = files.template(
        name="Node exporter: listen on loopback only",
        src=beside(__file__, "default.j2"),
        dest="/etc/default/prometheus-node-exporter",
        mode="644",
        args=[f"--web.listen-address=127.0.0.1:{NODE_EXPORTER_PORT}"],
        environment={},
    )
    systemd.service(
        name="Run the node exporter",
        service="prometheus-node-exporter",
        running=True,
        enabled=True,
        restarted=node.will_change,
    )
    redis_exporter = secret_file(
        name="Redis exporter: loopback only, with the Redis password (never printed)",
        dest="/etc/default/prometheus-redis-exporter",
        content=render(
            "monitoring/default.j2",
            args=[],
            environment={
                "REDIS_ADDR": f"redis://127.0.0.1:{redis_port}",
                "REDIS_PASSWORD": redis_password,
                "REDIS_EXPORTER_WEB_LISTEN_ADDRESS": f"127.0.0.1:{REDIS_EXPORTER_PORT}",
            },
        ),
        mode="600",
    )
    systemd.service(
        name="Run the Redis exporter",
        service="prometheus-redis-exporter",
        running=True,
        enabled=True,
        restarted=redis_exporter.will_change,
    )


def _alertmanager(*, alertmanager: dict[str, Any], alert_credential: str | None) -> None:
    """Alertmanager routing to the configured receiver, with its credential kept in a file."""
    variables: dict[str, Any] = dict(alertmanager)
    if alert_credential:
        secret_file(
            name="Keep the alert receiver's credential for Alertmanager (never printed)",
            dest=ALERT_CREDENTIAL,
            content=alert_credential,
            group="prometheus",
            mode="640",
        )
        key = (
            "alert_email_password_file"
            if variables.get("alert_receiver") == "email"
            else ("alert_webhook_token_file")
        )
        variables[key] = ALERT_CREDENTIAL
    am_config = files.template(
        name=f"Route alerts to the {variables.get('alert_receiver', 'none')} receiver",
        src=str(MONITORING / "alertmanager.yml"),
        dest=f"{ETC}/alertmanager.yml",
        mode="644",
        **variables,
    )
    am_flags = files.template(
        name="Alertmanager: listen on loopback only, no cluster port",
        src=beside(__file__, "default.j2"),
        dest="/etc/default/prometheus-alertmanager",
        mode="644",
        args=[f"--web.listen-address=127.0.0.1:{ALERTMANAGER_PORT}", "--cluster.listen-address="],
        environment={},
    )
    server.shell(
        name="Check the Alertmanager configuration",
        commands=[f"amtool check-config {ETC}/alertmanager.yml"],
        _if=am_config.did_change,
    )
    systemd.service(
        name="Run Alertmanager, restarted only when its configuration changed",
        service="prometheus-alertmanager",
        running=True,
        enabled=True,
        restarted=am_config.will_change or am_flags.will_change,
    )
