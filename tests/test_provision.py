"""Provisioning, rebuild and teardown run by the real `pyinfra` CLI (@local) against a stateful
fake of the Hetzner Cloud API on loopback (tests/hcloud_fake.py), through the real `hcloud`
library: what exists afterwards, what a second run does, and the one line each API error ends with.
"""

from __future__ import annotations

import re
import runpy
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hcloud.images import Image
from hcloud.server_types import ServerType

from deploys.data import InventoryError, ProvisionData, provision_data
from roles.hetzner.cloud import Cloud, CloudError, Names, fingerprint
from roles.hetzner.preflight import preflight
from tests.hcloud_fake import TOKEN, FakeHetzner
from tests.provisioning import Run, base_settings, pyinfra
from tests.pyinfra_fake import REPO, group_defaults

NAME = "bluesky-appliance"
LABELS = {"appliance": NAME}


@pytest.fixture(scope="session")
def public_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sshkey")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator", "-f", directory / "id"],
        check=True,
    )
    return directory / "id.pub"


@pytest.fixture
def settings(public_key: Path) -> dict[str, Any]:
    return base_settings(public_key)


@pytest.fixture
def fake() -> Iterator[FakeHetzner]:
    """An empty project; lists of more than two items come in pages."""
    api = FakeHetzner(per_page_cap=2)
    api.start()
    yield api
    api.stop()


@dataclass
class Provisioned:
    run: Run
    snapshot: dict[str, Any]


@pytest.fixture(scope="module")
def first_run(public_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    """One provisioning of an empty project (with four other servers in it), kept as a snapshot
    that each test needing a provisioned project starts from."""
    api = FakeHetzner(per_page_cap=2)
    api.start()
    for i in range(4):
        api.add("servers", name=f"other-{i}", labels={"appliance": "another"}, ipv4_id=None)
    run = pyinfra("provision", api, base_settings(public_key), tmp_path_factory.mktemp("first"))
    api.stop()
    assert run.returncode == 0, run.output[-3000:]
    yield Provisioned(run, api.snapshot())


@pytest.fixture
def provisioned(fake: FakeHetzner, first_run: Provisioned) -> FakeHetzner:
    """A project as the first provisioning left it."""
    fake.restore(first_run.snapshot)
    return fake


def provision(fake: FakeHetzner, settings: dict[str, Any], tmp_path: Path, *args: str) -> Run:
    return pyinfra("provision", fake, settings, tmp_path, *args)


def names_of(fake: FakeHetzner, kind: str) -> list[str]:
    return sorted(o["name"] for o in fake.state[kind].values())


def ours(fake: FakeHetzner) -> dict[str, Any]:
    server = fake.named("servers", NAME)
    assert server is not None
    return server


# --- provisioning ---------------------------------------------------------------------------


def test_dry_run_shows_the_plan_and_changes_nothing(
    fake: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    run = provision(fake, settings, tmp_path, "--dry")
    assert run.returncode == 0, run.output[-3000:]
    assert run.hetzner_lines()[:6] == [
        "Hetzner: a cx22 in fsn1 costs 3.79 EUR a month before VAT (4.51 with it), by Hetzner's "
        "price list; the volume and the IPv4 cost extra (see docs/operations.md)",
        "Hetzner plan: upload the SSH key bluesky-appliance-admin",
        "Hetzner plan: create the firewall bluesky-appliance (SSH from 1 admin address(es), 80/443 public)",
        "Hetzner plan: reserve the primary IPv4 bluesky-appliance-ipv4 in fsn1",
        "Hetzner plan: create the server bluesky-appliance (cx22 in fsn1, debian-12)",
        "Hetzner plan: create the 40 GB volume bluesky-appliance-data attached to bluesky-appliance",
    ]
    assert fake.writes() == []


def test_first_run_creates_everything_labelled_and_attached_and_a_second_changes_nothing(
    provisioned: FakeHetzner,
    first_run: Provisioned,
    settings: dict[str, Any],
    tmp_path: Path,
    public_key: Path,
) -> None:
    fake = provisioned
    assert first_run.run.totals()["changed"] == 5
    state = fake.state
    assert names_of(fake, "ssh_keys") == ["bluesky-appliance-admin"]
    assert names_of(fake, "firewalls") == [NAME]
    assert names_of(fake, "primary_ips") == ["bluesky-appliance-ipv4"]
    assert names_of(fake, "volumes") == ["bluesky-appliance-data"]
    for kind in ("ssh_keys", "firewalls", "primary_ips", "volumes"):
        assert [o["labels"] for o in state[kind].values()] == [LABELS], kind
    server = ours(fake)
    assert server["labels"] == LABELS
    (volume,) = state["volumes"].values()
    (ipv4,) = state["primary_ips"].values()
    (firewall,) = state["firewalls"].values()
    (key,) = state["ssh_keys"].values()
    assert (server["server_type"]["name"], server["location"]["name"], server["image"]["name"]) == (
        "cx22",
        "fsn1",
        "debian-12",
    )
    assert server["ssh_keys"] == [key["id"]]
    assert key["public_key"] == public_key.read_text().strip()
    assert volume["server"] == server["id"] and volume["size"] == 40
    assert ipv4["assignee_id"] == server["id"] and ipv4["auto_delete"] is False
    assert firewall["applied_to"] == [{"type": "server", "server": {"id": server["id"]}}]
    assert {(r["port"], tuple(r["source_ips"])) for r in firewall["rules"]} == {
        ("22", ("198.51.100.7/32",)),
        ("80", ("0.0.0.0/0", "::/0")),
        ("443", ("0.0.0.0/0", "::/0")),
    }
    assert {r["direction"] for r in firewall["rules"]} == {"in"}
    assert (
        f"Hetzner: server {NAME} at {ipv4['ip']} (cx22 in fsn1), data volume "
        f"/dev/disk/by-id/scsi-0HC_Volume_{volume['id']}" in first_run.run.hetzner_lines()
    )

    second = provision(fake, settings, tmp_path)
    assert second.returncode == 0, second.output[-3000:]
    assert second.totals() == {"operations": 6, "changed": 0, "errors": 0, "no_change": 6}
    assert fake.writes() == []  # not one request that could change anything


def test_changed_settings_are_applied_in_place_where_hetzner_allows_it(
    provisioned: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    fake = provisioned
    server_id = ours(fake)["id"]
    servers = sorted(fake.state["servers"])
    settings.update(hcloud_volume_size_gb=60, admin_ssh_addresses=["198.51.100.7", "192.0.2.0/24"])
    run = provision(fake, settings, tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert run.totals()["changed"] == 2
    assert "Hetzner: grow the volume bluesky-appliance-data from 40 to 60 GB: done" in (
        run.hetzner_lines()
    )
    (volume,) = fake.state["volumes"].values()
    assert volume["size"] == 60 and volume["server"] == server_id
    (firewall,) = fake.state["firewalls"].values()
    ssh = next(r for r in firewall["rules"] if r["port"] == "22")
    assert sorted(ssh["source_ips"]) == ["192.0.2.0/24", "198.51.100.7/32"]
    assert sorted(fake.state["servers"]) == servers  # the same server, no other


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"hcloud_volume_size_gb": 20},
            "hcloud_volume_size_gb: the volume bluesky-appliance-data has 40 GB, the inventory "
            "says 20; Hetzner volumes only grow: set it to 40 or more",
        ),
        (
            {"hcloud_location": "hel1"},
            "hcloud_location: the server bluesky-appliance is in fsn1, the inventory says hel1; "
            "Hetzner cannot move a server",
        ),
    ],
    ids=["volume-shrink", "location-change"],
)
def test_changes_hetzner_cannot_make_are_refused_before_anything_changes(
    provisioned: FakeHetzner,
    settings: dict[str, Any],
    tmp_path: Path,
    change: dict[str, Any],
    expected: str,
) -> None:
    settings.update(change)
    run = provision(provisioned, settings, tmp_path)
    assert run.returncode != 0
    assert expected in run.error_line()
    assert provisioned.writes() == []


def test_rebuild_keeps_the_volume_and_the_ip(
    provisioned: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    fake = provisioned
    server = ours(fake)
    (ipv4,) = fake.state["primary_ips"].values()
    (volume,) = fake.state["volumes"].values()
    before = (server["id"], ipv4["ip"], volume["id"], volume["server"])
    run = pyinfra("rebuild", fake, settings, tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    server = ours(fake)
    assert server["rebuilds"] == 1
    assert ("POST", f"/servers/{server['id']}/actions/rebuild") in fake.writes()
    assert (server["id"], ipv4["ip"], volume["id"], volume["server"]) == before
    assert f"Hetzner: server {NAME} at {ipv4['ip']} (cx22 in fsn1)" in run.output


def test_teardown_needs_a_confirmation_naming_the_project_and_keeps_the_volume(
    provisioned: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    fake = provisioned
    refused = pyinfra("teardown", fake, settings, tmp_path, "-y")
    assert refused.returncode != 0
    assert (
        "teardown: nothing deleted; to delete bluesky-appliance's server, firewall, primary "
        "IP and SSH key run again with --data teardown_confirm=bluesky-appliance"
        in refused.error_line()
    )
    assert fake.writes() == []

    confirmed = ["-y", "--data", f"teardown_confirm={NAME}"]
    run = pyinfra("teardown", fake, settings, tmp_path, *confirmed)
    assert run.returncode == 0, run.output[-3000:]
    for kind in ("firewalls", "primary_ips", "ssh_keys"):
        assert fake.state[kind] == {}, kind
    assert names_of(fake, "servers") == [f"other-{i}" for i in range(4)]  # not ours: kept
    (volume,) = fake.state["volumes"].values()
    assert volume["server"] is None
    assert "the volume bluesky-appliance-data and its data are kept" in run.output

    run = pyinfra(
        "teardown", fake, settings, tmp_path, *confirmed, "--data", f"teardown_volume={NAME}"
    )
    assert run.returncode == 0, run.output[-3000:]
    assert fake.state["volumes"] == {}


def test_a_key_already_in_the_project_under_another_name_is_used_as_it_is(
    fake: FakeHetzner, settings: dict[str, Any], tmp_path: Path, public_key: Path
) -> None:
    text = public_key.read_text().strip()
    laptop = fake.add("ssh_keys", name="laptop", public_key=text, fingerprint=fingerprint(text))
    run = provision(fake, settings, tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert names_of(fake, "ssh_keys") == ["laptop"]
    assert ours(fake)["ssh_keys"] == [laptop["id"]]
    confirmed = ["-y", "--data", f"teardown_confirm={NAME}"]
    assert pyinfra("teardown", fake, settings, tmp_path, *confirmed).returncode == 0
    assert names_of(fake, "ssh_keys") == ["laptop"]  # not the appliance's: never deleted


# --- errors: one line naming the fix ----------------------------------------------------------


def test_a_bad_token_ends_the_run_with_one_line_and_changes_nothing(
    fake: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    run = pyinfra("provision", fake, settings, tmp_path, token="not-the-token")
    assert run.returncode != 0
    assert run.error_line().endswith(
        "the Hetzner API did not accept the token while trying to read the project (checking the "
        "token) (unauthorized): set HCLOUD_TOKEN to a valid Read & Write API token of the project"
    )
    assert "Traceback" not in run.output
    assert fake.writes() == []


def test_a_quota_stop_half_way_says_what_exists(
    fake: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    fake.fail("POST", r"^/servers$", 403, "resource_limit_exceeded", "server limit exceeded")
    run = provision(fake, settings, tmp_path)
    assert run.returncode != 0
    lines = run.hetzner_lines()
    assert (
        "Hetzner: Hetzner refused to create the server bluesky-appliance (cx22 in fsn1, "
        "debian-12): server limit exceeded (resource_limit_exceeded): the project's resource "
        "limit is reached; delete what it no longer needs or ask Hetzner to raise the limit "
        "(Hetzner Console → Limits), then run again" in lines
    )
    exists = next(line for line in lines if "stopped half-way" in line)
    for made in ("server ", "volume "):
        assert f", {made}" not in exists and f": {made}" not in exists
    for made in (
        "firewall bluesky-appliance",
        "primary ip bluesky-appliance-ipv4",
        "ssh key bluesky-appliance-admin",
    ):
        assert made in exists
    # Fixed (the fault was one-off): the next run goes on from there.
    again = provision(fake, settings, tmp_path)
    assert again.returncode == 0 and again.totals()["changed"] == 2


def test_a_failed_action_ends_the_run_with_its_error(
    fake: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    fake.fail_action("create_volume", "volume_create_failed", "could not create the volume")
    run = provision(fake, settings, tmp_path)
    assert run.returncode != 0
    line = next(line for line in run.hetzner_lines() if "failed (" in line)
    assert line.startswith(
        "Hetzner: Hetzner could not create the 40 GB volume bluesky-appliance-data attached to "
        "bluesky-appliance: its action create_volume failed (volume_create_failed: could not "
        "create the volume); run again"
    )
    exists = next(line for line in run.hetzner_lines() if "stopped half-way" in line)
    assert "server bluesky-appliance (id" in exists and "firewall bluesky-appliance" in exists


def test_a_long_rate_limit_stops_with_the_time_to_come_back(
    fake: FakeHetzner, settings: dict[str, Any], tmp_path: Path
) -> None:
    fake.fail(
        "GET",
        r"^/servers$",
        429,
        "rate_limit_exceeded",
        "limit of 3600 requests per hour reached",
        headers={"Retry-After": "1800", "RateLimit-Limit": "3600", "RateLimit-Remaining": "0"},
    )
    run = provision(fake, settings, tmp_path)
    assert run.returncode != 0
    assert run.error_line().endswith(
        "Hetzner API rate limit reached while trying to read the project (checking the token): "
        "the project's requests are used up for now; run again in 1800 s"
    )
    assert fake.writes() == []


# --- the same errors, in process (cheap) --------------------------------------------------------


@pytest.fixture
def cloud(fake: FakeHetzner) -> Cloud:
    return Cloud(TOKEN, endpoint=fake.url, poll_interval_s=0.01, rate_limit_wait_s=5)


NAMES = Names(appliance=NAME, ssh_key=f"{NAME}-admin")
WANTED = {
    "server_type": "cx22",
    "location": "fsn1",
    "image": "debian-12",
    "volume_size_gb": 40,
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"server_type": "cx99"}, "hcloud_server_type 'cx99' is not offered by Hetzner Cloud"),
        ({"location": "mars1"}, "hcloud_location 'mars1' is not a Hetzner Cloud location"),
        ({"image": "debian-7"}, "hcloud_image 'debian-7' is not a Hetzner image"),
    ],
)
def test_an_unknown_server_type_location_or_image_is_named(
    cloud: Cloud, change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(CloudError, match=re.escape(expected)):
        preflight(cloud, NAMES, **{**WANTED, **change})


def test_hetzner_rejecting_a_field_names_the_inventory_value(cloud: Cloud) -> None:
    with pytest.raises(CloudError) as caught, cloud.doing("create the server"):
        cloud.client.servers.create(
            name="x", server_type=ServerType(name="cx99"), image=Image(name="debian-12")
        )
    assert str(caught.value) == (
        "Hetzner refused to create the server: invalid input in field 'server_type' "
        "(invalid_input): check hcloud_server_type in inventory/group_data/all.py"
    )


def test_a_short_rate_limit_is_waited_out_as_hetzner_says(fake: FakeHetzner, cloud: Cloud) -> None:
    fake.fail(
        "GET", r"^/servers$", 429, "rate_limit_exceeded", "slow down", headers={"Retry-After": "1"}
    )
    with cloud.doing("list the servers"):
        assert cloud.find("servers", NAME) is None
    assert fake.requests.count(("GET", "/servers")) == 2


def test_a_resource_of_the_same_name_without_the_label_is_not_taken_over(
    fake: FakeHetzner, cloud: Cloud
) -> None:
    fake.add("volumes", name=f"{NAME}-data", size=10, server=None, location={"name": "fsn1"})
    with pytest.raises(
        CloudError,
        match="a volume named 'bluesky-appliance-data' exists in the project without the label appliance=bluesky-appliance",
    ):
        preflight(cloud, NAMES, **WANTED)


def test_an_unreachable_api_is_named() -> None:
    unreachable = Cloud(TOKEN, endpoint="http://127.0.0.1:9/v1")
    expected = re.escape("cannot reach the Hetzner API at http://127.0.0.1:9/v1")
    with pytest.raises(CloudError, match=expected), unreachable.doing("read the project"):
        unreachable.find("servers", NAME)


# --- inputs -----------------------------------------------------------------------------------


def test_the_provisioning_data_is_validated(public_key: Path) -> None:
    values = {**group_defaults(), "admin_ssh_addresses": ["198.51.100.7"]}
    data = provision_data({**values, "hcloud_ssh_public_key": str(public_key)})
    assert isinstance(data, ProvisionData)
    assert data.ssh_key_name == "bluesky-appliance-admin"
    assert data.public_key().startswith("ssh-ed25519 ")
    with pytest.raises(InventoryError, match="hcloud_volume_size_gb"):
        provision_data({**values, "hcloud_volume_size_gb": 5})
    private = public_key.with_suffix("")
    with pytest.raises(InventoryError, match="is not one OpenSSH public key line"):
        provision_data({**values, "hcloud_ssh_public_key": str(private)}).public_key()
    with pytest.raises(InventoryError, match=re.escape("cannot read /nonexistent/key.pub")):
        provision_data({**values, "hcloud_ssh_public_key": "/nonexistent/key.pub"}).public_key()


# --- the inventory that lists the servers by label ----------------------------------------------


def test_the_hetzner_inventory_lists_the_provisioned_server_with_its_volume(
    provisioned: FakeHetzner, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = provisioned
    # Labelled servers without a public IPv4 (unreachable: left out), so the list spans pages.
    for i in range(4):
        fake.add("servers", name=f"spare-{i}", labels=LABELS, ipv4_id=None)
    monkeypatch.setenv("HCLOUD_TOKEN", TOKEN)
    monkeypatch.setenv("HCLOUD_ENDPOINT", fake.url)
    hosts = runpy.run_path(str(REPO / "inventory" / "hetzner.py"))["appliance"]
    assert fake.requests.count(("GET", "/servers")) == 3  # five servers, two per page
    (ipv4,) = fake.state["primary_ips"].values()
    (volume,) = fake.state["volumes"].values()
    assert hosts == [
        (
            ipv4["ip"],
            {
                "ssh_user": "root",
                "hcloud_server": NAME,
                "hcloud_id": ours(fake)["id"],
                "volume_device": volume["linux_device"],
            },
        )
    ]
