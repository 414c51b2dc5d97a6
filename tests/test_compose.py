"""docker-compose.yml and the Dockerfile: validated by a real compose implementation (Debian's
docker-compose 1.29, `config`), their structure checked on its output, the config step's
rendering run for real (redis-server and amtool accept what it writes), and — wherever a Docker
engine is reachable — the whole stack brought up with pytest-docker until a search answers
through Caddy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
EXAMPLE = REPO / ".env.example"
APPLIANCE_SERVICES = {"ingester", "batcher", "api"}

needs_compose = pytest.mark.skipif(
    not shutil.which("docker-compose"),
    reason="docker-compose missing (make system-deps installs Debian's docker-compose)",
)


def compose(*args: str, env_file: Path = EXAMPLE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "ALERT_"))}
    return subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The compose file as docker-compose resolves it with .env.example's values."""
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose missing (make system-deps installs Debian's docker-compose)")
    done = compose("config")
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = yaml.safe_load(done.stdout)
    return loaded


@needs_compose
def test_docker_compose_accepts_the_file() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


@needs_compose
def test_a_missing_secret_is_named(tmp_path: Path) -> None:
    partial = tmp_path / "env"
    partial.write_text(
        "\n".join(
            line
            for line in EXAMPLE.read_text().splitlines()
            if not line.startswith("GRAFANA_ADMIN_PASSWORD=")
        )
    )
    done = compose("config", "-q", env_file=partial)
    assert done.returncode != 0
    assert "set GRAFANA_ADMIN_PASSWORD in .env (see .env.example)" in done.stderr


def test_the_stack_has_every_service_with_a_healthcheck(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {
        "config",
        "redis",
        "ingester",
        "batcher",
        "api",
        "identity",
        "caddy",
        "prometheus",
        "node-exporter",
        "redis-exporter",
        "alertmanager",
        "grafana",
    }
    for name, service in services.items():
        if name != "config":  # a one-shot step: the others wait for it to complete
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_services_start_after_what_they_need_is_healthy(config: dict[str, Any]) -> None:
    services = config["services"]
    needs = {name: s.get("depends_on", {}) for name, s in services.items()}
    for name in APPLIANCE_SERVICES | {"redis-exporter"}:
        assert needs[name]["redis"] == {"condition": "service_healthy"}, name
    assert needs["caddy"] == {
        "api": {"condition": "service_healthy"},
        "grafana": {"condition": "service_healthy"},
    }
    assert needs["grafana"] == {"prometheus": {"condition": "service_healthy"}}
    for name in ("redis", "alertmanager"):
        assert needs[name] == {"config": {"condition": "service_completed_successfully"}}


def test_only_the_proxy_publishes_ports(config: dict[str, Any]) -> None:
    published = {name for name, s in config["services"].items() if s.get("ports")}
    assert published == {"caddy"}
    targets = sorted(int(p["target"]) for p in config["services"]["caddy"]["ports"])
    assert targets == [80, 443]


def mounts(config: dict[str, Any], service: str) -> dict[str, str]:
    """target -> source of a service's volumes (docker-compose 1.29 prints `source:target[:mode]`;
    a bind's source is an absolute path, shown here relative to the repository)."""
    out = {}
    for spec in config["services"][service].get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith(str(REPO)):
            source = str(Path(source).relative_to(REPO))
        out[target] = source
    return out


def test_data_redis_and_prometheus_live_in_named_volumes(config: dict[str, Any]) -> None:
    assert mounts(config, "batcher")["/data/parquet"] == "parquet"
    assert mounts(config, "api")["/data/parquet"] == "parquet"
    assert config["services"]["api"]["volumes"] == ["parquet:/data/parquet:ro"]
    assert mounts(config, "redis")["/data"] == "redis"
    assert mounts(config, "prometheus")["/prometheus"] == "prometheus"
    assert {"parquet", "redis", "prometheus"} <= set(config["volumes"])


def test_monitoring_uses_the_repositorys_one_copy(config: dict[str, Any]) -> None:
    assert mounts(config, "prometheus") == {
        "/etc/prometheus/prometheus.yml": "monitoring/prometheus.yml",
        "/etc/prometheus/rules": "monitoring/rules",
        "/etc/prometheus/targets": "compose/targets",
        "/prometheus": "prometheus",
    }
    assert mounts(config, "grafana") == {
        "/etc/grafana/provisioning/datasources": "monitoring/grafana/provisioning/datasources",
        "/etc/grafana/provisioning/dashboards": "monitoring/grafana/provisioning/dashboards",
        "/var/lib/grafana/dashboards": "monitoring/dashboards",
        "/var/lib/grafana": "grafana",
    }
    assert mounts(config, "config") == {"/monitoring": "monitoring", "/config": "config"}
    assert config["services"]["grafana"]["environment"]["PROMETHEUS_URL"] == (
        "http://prometheus:9090"
    )


def test_compose_scrape_targets_name_the_services_that_listen_there(
    config: dict[str, Any],
) -> None:
    """Every job of monitoring/prometheus.yml has a compose target file, at a service's port."""
    prometheus = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    files = {
        f
        for job in prometheus["scrape_configs"]
        for sd in job["file_sd_configs"]
        for f in sd["files"]
    }
    ports = {"ingester": 9101, "batcher": 9102, "api": 8080, "redis-exporter": 9121}
    ports |= {"identity": 9103}
    ports |= {"node-exporter": 9100, "prometheus": 9090, "alertmanager": 9093}
    for name in files:
        (group,) = yaml.safe_load((REPO / "compose" / name).read_text())
        (target,) = group["targets"]
        service, port = target.split(":")
        assert service in config["services"] and ports[service] == int(port), name


def test_secrets_come_from_the_env_file_only() -> None:
    text = COMPOSE.read_text()
    for secret in (
        "APPLIANCE_REDIS_PASSWORD",
        "APPLIANCE_API_CURSOR_SECRET",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        # Each use is a required substitution, never a default value.
        uses = re.findall(rf"\$\{{{secret}[^}}]*\}}", text)
        assert uses and all(u.startswith(f"${{{secret}:?") for u in uses), secret
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=REPO, check=False
    ).returncode
    assert ignored == 0, ".env must be git-ignored"
    assert (
        subprocess.run(
            ["git", "check-ignore", "-q", ".env.example"], cwd=REPO, check=False
        ).returncode
        == 1
    )


def test_the_image_is_multi_stage_non_root_and_installs_the_wheel() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.MULTILINE)
    assert len(stages) == 2 and stages[0][1] == "build" and stages[1][1] == ""
    final = text.split("\nFROM ")[-1]
    assert "pip wheel" in text.split("\nFROM ")[-2]
    assert "--no-index --find-links" in final and "bluesky-appliance" in final
    assert re.search(r"^USER appliance$", final, re.MULTILINE)
    assert "useradd --system --uid 10001" in final
    # No compiler or build toolchain gets into the final stage.
    for tool in ("build-essential", "gcc", "apt-get install", "COPY . "):
        assert tool not in final, tool
    assert "COPY --from=build /wheels" in final


def render_config(config_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the compose stack's config step here, writing into `config_dir`."""
    return subprocess.run(
        [sys.executable, str(REPO / "compose" / "render_config.py")],
        env={
            "PATH": os.environ["PATH"],
            "CONFIG_DIR": str(config_dir),
            "MONITORING_DIR": str(REPO / "monitoring"),
            "APPLIANCE_REDIS_PASSWORD": "a-Redis-Secret-1234",
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_config_step_renders_what_redis_and_alertmanager_accept(tmp_path: Path) -> None:
    done = render_config(
        tmp_path / "config",
        ALERT_RECEIVER="webhook",
        ALERT_WEBHOOK_URL="https://hooks.example.org/alerts",
        ALERT_CREDENTIAL="a-Webhook-Token-5678",
    )
    assert done.returncode == 0, done.stderr
    assert "Secret" not in done.stdout + done.stderr
    conf = (tmp_path / "config" / "redis" / "redis.conf").read_text()
    assert "requirepass a-Redis-Secret-1234" in conf and "maxmemory-policy noeviction" in conf
    alertmanager = tmp_path / "config" / "alertmanager" / "alertmanager.yml"
    text = alertmanager.read_text()
    assert "a-Webhook-Token-5678" not in text  # the token goes in its own file
    assert json.dumps(str(tmp_path / "config" / "alertmanager" / "credential")) in text
    assert (tmp_path / "config" / "alertmanager" / "credential").read_text().strip() == (
        "a-Webhook-Token-5678"
    )
    if shutil.which("amtool"):
        checked = subprocess.run(
            ["amtool", "check-config", str(alertmanager)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    if shutil.which("redis-server"):
        # redis-server has no check mode: start it on the rendered file and ask it something.
        port = _free_port()
        (tmp_path / "redis").mkdir()
        local = conf.replace("dir /data", f"dir {tmp_path / 'redis'}").replace(
            "port 6379", f"port {port}"
        )
        (tmp_path / "redis.conf").write_text(local)
        proc = subprocess.Popen(
            ["redis-server", str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL
        )
        try:
            ping = _wait_for_redis(port)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        assert ping == b"-NOAUTH Authentication required.\r\n"


def test_the_config_step_names_a_missing_webhook_url(tmp_path: Path) -> None:
    done = render_config(tmp_path, ALERT_RECEIVER="webhook")
    assert done.returncode == 1
    assert done.stderr.strip() == "ALERT_RECEIVER=webhook needs ALERT_WEBHOOK_URL in .env"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_redis(port: int) -> bytes:
    def ping() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(100)

    return wait_until(ping, 10, f"redis on port {port}", interval=0.1, errors=(OSError,))


# --- the running stack (only where a Docker engine answers) -------------------------------------


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skip unless `docker info` reaches an engine (pytest-docker errors instead of skipping)."""
    if not shutil.which("docker"):
        pytest.skip("no docker client on this machine")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        pytest.skip(f"no Docker engine reachable ({reason})")


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "docker-compose" if shutil.which("docker-compose") else "docker compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> list[str]:
    return [str(COMPOSE), str(REPO / "tests" / "compose.replay.yml")]


@pytest.fixture(scope="session")
def stack(docker_engine: None, request: pytest.FixtureRequest) -> Iterator[int]:
    """The stack up with a replay server as its Jetstream; yields Caddy's HTTPS port."""
    https_port = _free_port()
    values = {
        "APPLIANCE_REDIS_PASSWORD": "stack-Redis-Secret-1234",
        "APPLIANCE_API_CURSOR_SECRET": "stack-Cursor-Secret-5678",
        "GRAFANA_ADMIN_PASSWORD": "stack-Grafana-Secret-9012",
        "HTTP_PORT": str(_free_port()),
        "HTTPS_PORT": str(https_port),
        "SITE_ADDRESS": "localhost",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        request.getfixturevalue("docker_services")
        yield https_port
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
def test_the_stack_answers_a_search_through_caddy(stack: int) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # Caddy's internal CA

    def search() -> list[Any]:
        url = f"https://localhost:{stack}/v1/search?limit=5"
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return json.loads(response.read())["posts"]  # type: ignore[no-any-return]

    posts = wait_until(
        search, 600, "a search answered through Caddy", interval=3, errors=(OSError,)
    )
    assert all(post["uri"].startswith("at://") for post in posts)
