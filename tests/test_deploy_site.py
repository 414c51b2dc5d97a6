"""The site deploy run by pyinfra against its fake connector: which operations run, what the
files they write say, and that no secret reaches a command line or an operation's name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pyinfra_fake import REPO, group_defaults, make_wheelhouse, run_fake

SITE = REPO / "deploys" / "site.py"
VOLUME = "/dev/disk/by-id/scsi-0HC_Volume_4242"
SECRETS = {
    "redis_password": "redis-Secret-0a1b2c3d4e5f",
    "api_cursor_secret": "cursor-Secret-6a7b8c9d0e1f",
    "grafana_admin_password": "grafana-Secret-2b3c4d5e6f7a",
    "alert_credential": "alert-Secret-8c9d0e1f2a3b",
}


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Any]:
    values = group_defaults()
    values.update(
        admin_ssh_addresses=["192.0.2.0/24", "2001:db8::/32"],
        volume_device=VOLUME,
        wheelhouse=str(make_wheelhouse(tmp_path / "wheelhouse")),
    )
    return values


@pytest.fixture
def supplied(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The operator supplies every secret through DEPLOY_SECRET_* variables."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(f"DEPLOY_SECRET_{name.upper()}", value)
    return SECRETS


def roles_in_order(names: list[str]) -> list[str]:
    return list(dict.fromkeys(n.split(" | ")[0] for n in names if " | " in n))


def test_roles_run_in_order_and_end_with_the_doctor(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    assert roles_in_order(run.op_names) == [
        "Prepare the base system",
        "Keep the secrets on the host",
        "Mount the data volume",
        "Configure the firewall",
        "Set up Redis",
        "Install and run the appliance services",
        "Set up monitoring",
        "Set up Grafana",
        "Put Caddy in front of the API",
    ]
    assert run.op_names[-1] == "Check the whole appliance with `appliance doctor`"
    doctor = [c for c in run.commands if c.startswith("appliance doctor")]
    assert doctor == [
        "appliance doctor --wait 120 --insecure --volume --url https://localhost/ready "
        "--prometheus http://127.0.0.1:9090"
    ]


def test_no_secret_on_a_command_line_or_in_an_operation_name(
    data: dict[str, Any], supplied: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data["alert_receiver"] = {"kind": "webhook", "webhook_url": "https://hooks.example.org/a"}
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    printed = run.everything_printed()
    for name, value in supplied.items():
        assert value not in printed, f"{name} appears in a command or an operation name"
    # ...and each reaches exactly the files that need it.
    holders = {
        name: sorted(dest for dest, body in run.uploads.items() if value in body)
        for name, value in supplied.items()
    }
    assert holders == {
        "redis_password": [
            "/etc/appliance/secrets.env",
            "/etc/appliance/secrets/redis_password",
            "/etc/default/prometheus-redis-exporter",
            "/etc/redis/redis.conf",
        ],
        "api_cursor_secret": [
            "/etc/appliance/secrets.env",
            "/etc/appliance/secrets/api_cursor_secret",
        ],
        "grafana_admin_password": [
            "/etc/appliance/secrets/grafana_admin_password",
            "/etc/grafana/admin_password",
        ],
        "alert_credential": [
            "/etc/appliance/secrets/alert_credential",
            "/etc/prometheus/alert_credential",
        ],
    }
    assert f"requirepass {supplied['redis_password']}" in run.uploaded("/etc/redis/redis.conf")
    # The secret-bearing files are root's (or their service group's) only.
    modes = {c for c in run.commands if c.startswith("chmod") and "/etc/appliance/secrets/" in c}
    assert modes and all(c.startswith("chmod 600 ") for c in modes)


def test_secrets_kept_on_the_host_are_reused(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    responses = {re.compile(r"cat /etc/appliance/secrets/redis_password"): "kept-on-host-1234"}
    run = run_fake(SITE, data=data, responses=responses, monkeypatch=monkeypatch)
    assert "requirepass kept-on-host-1234\n" in run.uploaded("/etc/redis/redis.conf")
    assert "APPLIANCE_REDIS_PASSWORD='kept-on-host-1234'" in run.uploaded(
        "/etc/appliance/secrets.env"
    )


def test_absent_secrets_are_generated_once_and_used_consistently(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    generated = run.uploaded("/etc/appliance/secrets/redis_password")
    assert len(generated) >= 32
    assert f"requirepass {generated}\n" in run.uploaded("/etc/redis/redis.conf")
    assert f'REDIS_PASSWORD="{generated}"' in run.uploaded("/etc/default/prometheus-redis-exporter")
    assert generated != run.uploaded("/etc/appliance/secrets/api_cursor_secret")
    assert "/etc/appliance/secrets/alert_credential" not in run.uploads  # never generated


def test_services_are_hardened_units_with_the_volume_and_redis_required(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    for unit, command in [("ingest", "ingest"), ("batch", "batch"), ("api", "serve")]:
        text = run.uploaded(f"/etc/systemd/system/appliance-{unit}.service")
        for line in [
            "User=appliance",
            "Requires=redis-server.service",
            "RequiresMountsFor=/srv/appliance",
            "ProtectSystem=strict",
            "ReadWritePaths=/srv/appliance/data",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "Restart=on-failure",
            "StartLimitBurst=10",
            "EnvironmentFile=/etc/appliance/secrets.env",
            f"ExecStart=/opt/appliance/current/venv/bin/appliance {command}",
        ]:
            assert line in text.splitlines(), f"{unit}: {line} missing"
    env = run.uploaded("/etc/appliance/appliance.env")
    assert "APPLIANCE_DATA_DIR='/srv/appliance/data'" in env
    assert "APPLIANCE_API_HOST='127.0.0.1'" in env
    assert "PASSWORD" not in env and "SECRET" not in env
    mount = run.uploaded("/etc/systemd/system/srv-appliance.mount")
    assert f"What={VOLUME}" in mount and "Where=/srv/appliance" in mount
    redis_conf = run.uploaded("/etc/redis/redis.conf")
    assert "bind 127.0.0.1 -::1" in redis_conf
    assert "dir /srv/appliance/redis" in redis_conf
    assert "maxmemory-policy noeviction" in redis_conf


def test_the_release_is_installed_offline_from_the_uploaded_wheelhouse(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    assert "/opt/appliance/wheelhouse/bluesky_appliance-0.1.0-py3-none-any.whl" in run.uploads
    installs = [c for c in run.commands if "pip install" in c]
    assert len(installs) == 1
    assert "--no-index --find-links /opt/appliance/wheelhouse" in installs[0]
    link = next(c for c in run.commands if "ln -s" in c)
    assert "/opt/appliance/releases/" in link and "/opt/appliance/current" in link


def test_a_new_release_restarts_the_services_and_old_releases_are_pruned(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = [f"/opt/appliance/releases/r{i}/.installed" for i in range(5)]
    responses = {re.compile(r"ls -1t /opt/appliance/releases"): listing}
    run = run_fake(SITE, data=data, responses=responses, monkeypatch=monkeypatch)
    restarts = [c for c in run.commands if re.search(r"systemctl (re)?start appliance-", c)]
    assert len(restarts) == 4
    removed = sorted(c for c in run.commands if c.startswith("rm -rf /opt/appliance/releases/r"))
    # keep_releases = 3: the new release and the two newest before it stay.
    assert removed == [f"rm -rf /opt/appliance/releases/r{i}" for i in (2, 3, 4)]


def test_the_firewall_admits_ssh_from_admins_and_the_web_from_anywhere(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    rules = run.uploaded("/etc/nftables.conf")
    assert "elements = { 192.0.2.0/24 }" in rules
    assert "elements = { 2001:db8::/32 }" in rules
    assert "ip saddr @admin_v4 tcp dport 22 accept" in rules
    assert "tcp dport { 80, 443 } accept" in rules
    assert "policy drop" in rules and "ct state established,related accept" in rules
    # established,related comes before any drop: the SSH session applying the rules survives.
    assert rules.index("established,related") < rules.index("counter")
    check, load = (run.commands.index(f"nft {a}-f /etc/nftables.conf") for a in ("-c ", ""))
    assert check < load


def test_caddy_uses_its_internal_ca_without_a_domain(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    caddyfile = run.uploaded("/etc/caddy/Caddyfile")
    assert "@fake/site, localhost {" in caddyfile
    assert "tls internal" in caddyfile
    assert "reverse_proxy 127.0.0.1:8080" in caddyfile
    assert "reverse_proxy 127.0.0.1:3000" in caddyfile
    assert "max_size 1MB" in caddyfile
    assert "handle @metrics {\n\t\trespond 404" in caddyfile
    assert "Strict-Transport-Security" not in caddyfile


def test_caddy_gets_a_real_certificate_for_a_domain(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data.update(domain="posts.example.org", acme_email="ops@example.org", grafana_enabled=False)
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    caddyfile = run.uploaded("/etc/caddy/Caddyfile")
    assert "posts.example.org, localhost {" in caddyfile
    assert "email ops@example.org" in caddyfile
    assert "tls internal" not in caddyfile
    assert "Strict-Transport-Security" in caddyfile
    assert "3000" not in caddyfile  # Grafana off: nothing proxied to it
    assert "Set up Grafana" not in roles_in_order(run.op_names)


def test_monitoring_listens_on_loopback_with_the_repository_files(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data["prometheus_retention"] = "45d"
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    assert (
        run.uploaded("/etc/prometheus/prometheus.yml")
        == (REPO / "monitoring" / "prometheus.yml").read_text()
    )
    flags = run.uploaded("/etc/default/prometheus")
    assert "--web.listen-address=127.0.0.1:9090" in flags
    assert "--storage.tsdb.retention.time=45d" in flags
    targets = yaml.safe_load(run.uploaded("/etc/prometheus/targets/ingester.yml"))
    assert targets == [{"targets": ["127.0.0.1:9101"], "labels": {"instance": "@fake/site"}}]
    assert "--web.listen-address=127.0.0.1:9093" in run.uploaded(
        "/etc/default/prometheus-alertmanager"
    )
    assert "127.0.0.1:9100" in run.uploaded("/etc/default/prometheus-node-exporter")


def test_an_alert_webhook_token_goes_to_a_file_alertmanager_reads(
    data: dict[str, Any], supplied: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data["alert_receiver"] = {"kind": "webhook", "webhook_url": "https://hooks.example.org/a"}
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    config = yaml.safe_load(run.uploaded("/etc/prometheus/alertmanager.yml"))
    assert config["route"]["receiver"] == "webhook"
    (hook,) = next(r for r in config["receivers"] if r["name"] == "webhook")["webhook_configs"]
    assert hook["url"] == "https://hooks.example.org/a"
    assert hook["http_config"]["authorization"]["credentials_file"] == (
        "/etc/prometheus/alert_credential"
    )
    assert supplied["alert_credential"] not in run.uploaded("/etc/prometheus/alertmanager.yml")


def test_a_volume_with_a_filesystem_is_mounted_and_never_formatted(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(
        SITE, data=data, responses={"blkid -o value": "block ext4"}, monkeypatch=monkeypatch
    )
    assert not [c for c in run.commands if c.startswith("mkfs")]
    assert "systemctl start srv-appliance.mount" in run.commands


@pytest.mark.parametrize(
    ("sizes", "grown"), [("4294967296 2147483648", True), ("2147483648 2147483648", False)]
)
def test_a_volume_grown_on_hetzner_gets_its_filesystem_grown(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, sizes: str, grown: bool
) -> None:
    responses = {"blkid -o value": "block ext4", "blockdev --getsize64": sizes}
    run = run_fake(SITE, data=data, responses=responses, monkeypatch=monkeypatch)
    assert [c for c in run.commands if c.startswith("resize2fs")] == (
        [f"resize2fs {VOLUME}"] if grown else []
    )


def test_a_blank_volume_is_formatted_once(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    assert [c for c in run.commands if c.startswith("mkfs")] == [
        f"mkfs.ext4 -q -L appliance-data {VOLUME}"
    ]


@pytest.mark.parametrize(
    ("answer", "message"),
    [("missing", "is not a block device"), ("block xfs", "holds a xfs filesystem")],
)
def test_a_missing_or_foreign_volume_stops_the_deploy(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, answer: str, message: str
) -> None:
    from pyinfra.api.exceptions import DeployError

    with pytest.raises(DeployError, match=message):
        run_fake(SITE, data=data, responses={"blkid -o value": answer}, monkeypatch=monkeypatch)


def test_without_a_volume_the_data_stays_on_the_system_disk(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data["volume_device"] = ""
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    steps = [n.split(" | ")[-1] for n in run.op_names]
    assert not [s for s in steps if "Format" in s or "mount" in s.lower()]
    assert "Create /srv/appliance/data for appliance" in steps
    assert not [c for c in run.commands if c.startswith("appliance doctor") and "--volume" in c]


def test_grafana_is_pinned_provisioned_private_and_behind_caddy(
    data: dict[str, Any], supplied: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grafana's apt repository is unreachable from the test machines, so the system test runs
    without it: here its operations and files are checked instead."""
    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    key = next(c for c in run.commands if "gpg --show-keys" in c)
    assert "B53AE77BADB630A683046005963FA27710458545" in key and "exit 1" in key
    assert any(
        "deb [signed-by=/etc/apt/keyrings/grafana.gpg] https://apt.grafana.com" in c
        for c in run.commands
    )
    dropin = run.uploaded("/etc/systemd/system/grafana-server.service.d/appliance.conf")
    for line in [
        "Environment=GF_SERVER_HTTP_ADDR=127.0.0.1",
        "Environment=GF_SERVER_ROOT_URL=https://@fake/site/grafana/",
        "Environment=GF_SERVER_SERVE_FROM_SUB_PATH=true",
        "Environment=GF_AUTH_ANONYMOUS_ENABLED=false",
        "Environment=GF_SECURITY_ADMIN_PASSWORD__FILE=/etc/grafana/admin_password",
        "Environment=PROMETHEUS_URL=http://127.0.0.1:9090",
    ]:
        assert line in dropin.splitlines()
    assert run.uploaded("/etc/grafana/admin_password") == supplied["grafana_admin_password"]
    datasource = yaml.safe_load(run.uploaded("/etc/grafana/provisioning/datasources/appliance.yml"))
    assert datasource["datasources"][0]["url"] == "${PROMETHEUS_URL}"
    dashboards = sorted((REPO / "monitoring" / "dashboards").glob("*.json"))
    assert dashboards
    for dashboard in dashboards:
        assert f"/var/lib/grafana/dashboards/{dashboard.name}" in run.uploads


def test_in_a_container_chrony_is_enabled_but_not_started(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    responses = {"systemd-detect-virt --container": "systemd-nspawn"}
    run = run_fake(SITE, data=data, responses=responses, monkeypatch=monkeypatch)
    assert any("chrony (enabled only" in name for name in run.op_names)
    assert "systemctl enable chrony.service" in run.commands
    assert not [c for c in run.commands if c.startswith("systemctl start chrony")]


def test_every_package_the_site_installs_is_declared_by_its_role(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system test's offline apt repository holds `roles.debian_packages()`: nothing the
    deploy installs may be missing from it (grafana comes from Grafana's own repository)."""
    from roles import debian_packages

    run = run_fake(SITE, data=data, monkeypatch=monkeypatch)
    installed: set[str] = set()
    for command in run.commands:
        if "apt-get" in command and " install " in command:
            words = command.split(" install ", 1)[1].split()
            installed.update(w for w in words if not w.startswith("-"))
    assert installed - {"grafana"} == set(debian_packages())


def test_rollback_steps_back_one_release_at_a_time(tmp_path: Path) -> None:
    """The rendered appliance-rollback script, run for real on a release tree made here (with a
    stand-in systemctl that records what it was asked)."""
    import os
    import subprocess

    import jinja2

    releases, current = tmp_path / "releases", tmp_path / "current"
    for age, name in enumerate(["new", "old", "older"]):
        (releases / name).mkdir(parents=True)
        stamp = releases / name / ".installed"
        stamp.touch()
        os.utime(stamp, (1_000_000 - age * 100, 1_000_000 - age * 100))
    current.symlink_to(releases / "new")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "systemctl").chmod(0o755)
    template = (REPO / "roles" / "appliance" / "rollback.sh.j2").read_text()
    script = tmp_path / "appliance-rollback"
    script.write_text(
        jinja2.Template(template).render(
            releases=str(releases), current=str(current), units=["appliance-api"]
        )
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert current.resolve() == releases / "old"
    assert calls.read_text() == "restart appliance-api\n"
    assert "rolled back from new to old" in done.stdout
    again = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert "rolled back from old to older" in again.stdout
    assert current.resolve() == releases / "older"
    last = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert last.returncode == 1
    assert "no release older than older" in last.stderr
    assert current.resolve() == releases / "older"
