from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.cli import main


def test_defaults_load_from_an_empty_environment() -> None:
    s = config.load_settings(environ={})
    assert s.batch_interval_s == 300.0
    assert s.result_limit is True
    assert s.page_size == 50


def test_environment_values_are_parsed_by_type() -> None:
    s = config.load_settings(
        environ={
            "APPLIANCE_REDIS_PORT": "6390",
            "APPLIANCE_RESULT_LIMIT": "off",
            "APPLIANCE_WANTED_COLLECTIONS": "app.bsky.feed.post, app.bsky.graph.*",
            "APPLIANCE_BATCH_INTERVAL_S": "2.5",
        }
    )
    assert s.redis_port == 6390
    assert s.result_limit is False
    assert s.wanted_collections == ("app.bsky.feed.post", "app.bsky.graph.*")
    assert s.batch_interval_s == 2.5


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"APPLIANCE_REDIS_PORT": "not-a-port"}, "APPLIANCE_REDIS_PORT"),
        ({"APPLIANCE_REDIS_PORT": "70000"}, "APPLIANCE_REDIS_PORT"),
        ({"APPLIANCE_RESULT_LIMIT": "maybe"}, "APPLIANCE_RESULT_LIMIT"),
        ({"APPLIANCE_LOG_LEVEL": "LOUD"}, "APPLIANCE_LOG_LEVEL"),
        ({"APPLIANCE_JETSTREAM_URLS": "http://x"}, "APPLIANCE_JETSTREAM_URLS"),
        ({"APPLIANCE_NO_SUCH_THING": "1"}, "APPLIANCE_NO_SUCH_THING"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(config.ConfigError, match=names):
        config.load_settings(environ=env)


def test_round_trip_through_child_environment() -> None:
    s = config.load_settings(environ={"APPLIANCE_WANTED_DIDS": "did:plc:a,did:plc:b"})
    assert config.load_settings(environ=config.to_environ(s)) == s


def test_config_command_masks_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_REDIS_PASSWORD", "hunter2-secret")
    assert main(["config", "-v"]) == 0
    out = capsys.readouterr().out
    assert "hunter2-secret" not in out
    assert "APPLIANCE_REDIS_PASSWORD" in out and "********" in out
    assert "Seconds between Parquet flushes" in out


def test_config_command_reports_bad_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_API_PORT", "-1")
    assert main(["config"]) == 2
    assert "APPLIANCE_API_PORT" in capsys.readouterr().err


def test_the_documented_settings_table_matches_the_declarations() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    block = page.split("<!-- settings:start -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert block == config.markdown_table(), "regenerate with `appliance config --markdown`"
