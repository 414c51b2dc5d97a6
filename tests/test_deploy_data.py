"""Inventory values are validated before any operation runs, each error naming the value."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest

from deploys.data import InventoryError, SiteData, site_data, supplied_secrets
from deploys.wheelhouse import WheelhouseError, missing_requirements, project_wheel, release_id
from tests.pyinfra_fake import group_defaults, make_wheelhouse


def valid() -> dict[str, Any]:
    data = group_defaults()
    data["admin_ssh_addresses"] = ["198.51.100.7"]
    return data


def test_the_defaults_with_an_admin_address_are_valid() -> None:
    site = site_data(valid())
    assert isinstance(site, SiteData)
    env = site.appliance_environment()
    assert env["APPLIANCE_DATA_DIR"] == "/srv/appliance/data"
    assert env["APPLIANCE_REDIS_DIR"] == "/srv/appliance/redis"
    assert env["APPLIANCE_JETSTREAM_URLS"].startswith("wss://jetstream1.us-east")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"admin_ssh_addresses": []}, r"admin_ssh_addresses"),
        ({"admin_ssh_addresses": ["10.0.0.300"]}, r"admin_ssh_addresses: '10.0.0.300'"),
        ({"data_root": "relative/path"}, r"data_root"),
        ({"data_root": "/"}, r"data_root"),
        ({"volume_device": "sdb"}, r"volume_device"),
        ({"redis_maxmemory": "lots"}, r"redis_maxmemory"),
        ({"prometheus_retention": "forever"}, r"prometheus_retention"),
        ({"domain": "not a name"}, r"domain"),
        ({"domain": "posts.example.org"}, r"acme_email"),
        ({"api_port": 9090}, r"ports: .*api_port"),
        ({"api_port": 6379}, r"ports: redis, API"),
        ({"api_workers": 0}, r"api_workers"),
        ({"jetstream_urls": ["http://x"]}, r"jetstream_urls"),
        ({"appliance_settings": {"APPLIANCE_DATA_DIR": "/x"}}, r"set by the site"),
        ({"appliance_settings": {"APPLIANCE_BATCH_INTERVAL_S": "-1"}}, r"BATCH_INTERVAL_S"),
        ({"appliance_settings": {"APPLIANCE_NO_SUCH": "1"}}, r"unknown setting"),
        ({"alert_receiver": {"kind": "pager"}}, r"alert_receiver"),
        ({"alert_receiver": {"kind": "webhook"}}, r"alert_receiver.webhook_url"),
        ({"alert_receiver": {"kind": "email", "email_to": "a@b"}}, r"email_from"),
        ({"grafana_apt_key_fingerprint": "abc"}, r"grafana_apt_key_fingerprint"),
        ({"keep_releases": 0}, r"keep_releases"),
        ({"site_addresses": ["bad name!"]}, r"site_addresses"),
    ],
)
def test_a_bad_value_is_refused_with_its_name(changes: dict[str, Any], message: str) -> None:
    data = valid()
    data.update(changes)
    with pytest.raises(InventoryError, match=message):
        site_data(data)


def test_a_missing_value_says_where_the_defaults_are() -> None:
    data = valid()
    del data["data_root"]
    with pytest.raises(
        InventoryError, match=r"missing inventory value\(s\): data_root .*group_data"
    ):
        site_data(data)


def test_secrets_come_from_the_environment_then_the_ignored_folder(tmp_path: Path) -> None:
    (tmp_path / "redis_password").write_text("from-file-1234\n")
    (tmp_path / "api_cursor_secret").write_text("file-cursor\n")
    env = {"DEPLOY_SECRET_API_CURSOR_SECRET": "from-env-5678"}
    assert supplied_secrets(env, tmp_path) == {
        "redis_password": "from-file-1234",
        "api_cursor_secret": "from-env-5678",
    }


@pytest.mark.parametrize("value", ["", "two words", "quote'd", "dollar$x", "a\nb"])
def test_a_secret_that_cannot_be_written_safely_is_refused(value: str, tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="secret redis_password"):
        supplied_secrets({"DEPLOY_SECRET_REDIS_PASSWORD": value}, tmp_path)


def test_the_release_names_the_code_not_the_build(tmp_path: Path) -> None:
    one = release_id(project_wheel(make_wheelhouse(tmp_path / "a", marker="1")))
    again = release_id(project_wheel(make_wheelhouse(tmp_path / "b", marker="1")))
    other = release_id(project_wheel(make_wheelhouse(tmp_path / "c", marker="2")))
    assert one == again != other


def test_a_missing_wheelhouse_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(WheelhouseError, match="make wheelhouse"):
        project_wheel(tmp_path / "nothing")


def _wheel(directory: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    with zipfile.ZipFile(directory / f"{dist}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\n" + "\n".join(lines))


def test_dependencies_are_chosen_for_the_hosts_python_not_this_one(tmp_path: Path) -> None:
    """redis needs async-timeout on Python < 3.11.3 (Debian 12 has 3.11.2): pip, evaluating
    markers against the builder's interpreter, would leave it out of the wheelhouse."""
    _wheel(tmp_path, "bluesky-appliance", "0.1.0", ["redis[hiredis]>=5.0", "rich>=13"])
    _wheel(
        tmp_path,
        "redis",
        "8.1.0",
        [
            'async-timeout>=4.0.3; python_full_version < "3.11.3"',
            'hiredis>=3.0.0; extra == "hiredis"',
            'cryptography>=36; extra == "ocsp"',
            'pywin32; sys_platform == "win32"',
        ],
    )
    _wheel(tmp_path, "rich", "15.0.0", [])
    missing = {str(r) for r in missing_requirements(tmp_path, "x86_64")}
    assert missing == {
        'async-timeout>=4.0.3; python_full_version < "3.11.3"',
        'hiredis>=3.0.0; extra == "hiredis"',
    }
    _wheel(tmp_path, "async-timeout", "5.0.1", [])
    _wheel(tmp_path, "hiredis", "3.5.0", [])
    assert missing_requirements(tmp_path, "x86_64") == []
