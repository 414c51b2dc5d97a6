"""monitoring/ checked offline with the real tools: promtool (config, rules, rule unit tests),
amtool (the Alertmanager template rendered for each receiver kind), the file_sd target files,
and every alert's runbook section in docs/monitoring.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import MONITORING, render_alertmanager

DOCS = REPO_ROOT / "docs" / "monitoring.md"
JOBS = ("ingester", "batcher", "api", "identity", "redis", "node", "prometheus", "alertmanager")

needs_promtool = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool missing")
needs_amtool = pytest.mark.skipif(not shutil.which("amtool"), reason="amtool missing")


def run(*cmd: str | Path, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "rules" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules() -> None:
    done = run("promtool", "check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    rules = sorted((MONITORING / "rules").glob("*.yml"))
    done = run("promtool", "check", "rules", *rules)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    tests = sorted((MONITORING / "tests").glob("*.yml"))
    done = run("promtool", "test", "rules", *tests, cwd=MONITORING / "tests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_test_that_shows_it_quiet_then_firing() -> None:
    checks: dict[str, list[tuple[str, bool]]] = {}
    for path in (MONITORING / "tests").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for check in group.get("alert_rule_test", []):
                checks.setdefault(check["alertname"], []).append(
                    (check["eval_time"], bool(check.get("exp_alerts")))
                )
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for name in names:
        seen = checks.get(name, [])
        assert any(fires for _, fires in seen), f"{name}: no test where it fires"
        assert any(not fires for _, fires in seen), f"{name}: no test where it stays quiet"


def test_every_alert_has_a_summary_a_description_and_a_runbook_section() -> None:
    text = DOCS.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, re.M)
    }
    for rule in alerts():
        notes = rule["annotations"]
        assert notes.get("summary") and notes.get("description"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/monitoring.md", rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]


def test_every_scrape_job_reads_a_shipped_target_file_with_a_friendly_instance() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    files = {
        job["job_name"]: [f for sd in job["file_sd_configs"] for f in sd["files"]]
        for job in config["scrape_configs"]
    }
    assert set(files) == set(JOBS)
    assert config["rule_files"] == ["rules/*.yml"]
    am = config["alerting"]["alertmanagers"][0]["file_sd_configs"][0]["files"]
    assert am == ["targets/alertmanager.yml"]
    for job, paths in files.items():
        assert paths == [f"targets/{job}.yml"]
        groups = yaml.safe_load((MONITORING / paths[0]).read_text())
        for group in groups:
            assert set(group) == {"targets", "labels"}
            assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in group["targets"])
            assert group["labels"]["instance"]


EMAIL = {
    "alert_receiver": "email",
    "alert_email_to": "ops@example.org",
    "alert_email_from": "appliance@example.org",
    "alert_email_smarthost": "smtp.example.org:587",
    "alert_email_username": "appliance",
    "alert_email_password_file": "/etc/prometheus/smtp-password",
}
WEBHOOK = {
    "alert_receiver": "webhook",
    "alert_webhook_url": "https://hooks.example.org/alerts",
    "alert_webhook_token_file": "/etc/prometheus/webhook-token",
}


@needs_amtool
@pytest.mark.parametrize(
    ("variables", "receiver"),
    [({}, "none"), ({"alert_receiver": "none"}, "none"), (WEBHOOK, "webhook"), (EMAIL, "email")],
    ids=["default", "none", "webhook", "email"],
)
def test_the_alertmanager_template_renders_a_valid_config_for_each_receiver(
    tmp_path: Path, variables: dict[str, str], receiver: str
) -> None:
    text = render_alertmanager(**variables)
    config = yaml.safe_load(text)
    assert config["route"]["receiver"] == receiver
    assert receiver in [r["name"] for r in config["receivers"]]
    # TargetDown inhibits the other alerts of the same target.
    assert {
        "source_matchers": ["alertname = TargetDown"],
        "target_matchers": ["alertname != TargetDown"],
        "equal": ["job", "instance"],
    } in config["inhibit_rules"]
    path = tmp_path / "alertmanager.yml"
    path.write_text(text)
    done = run("amtool", "check-config", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "password:" not in text and "credentials:" not in text  # only *_file options


def test_the_alertmanager_template_fails_loudly_without_what_a_receiver_needs() -> None:
    with pytest.raises(jinja2.UndefinedError, match="alert_webhook_url"):
        render_alertmanager(alert_receiver="webhook")
    with pytest.raises(jinja2.UndefinedError, match="alert_email_to"):
        render_alertmanager(alert_receiver="email")


@needs_amtool
def test_amtool_rejects_an_unknown_receiver_kind(tmp_path: Path) -> None:
    path = tmp_path / "alertmanager.yml"
    path.write_text(render_alertmanager(alert_receiver="pager"))
    done = run("amtool", "check-config", path)
    assert done.returncode != 0
    assert 'undefined receiver "pager"' in done.stdout + done.stderr
