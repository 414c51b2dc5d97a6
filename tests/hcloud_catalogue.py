"""The catalogue the fake Hetzner API (`hcloud_fake`) offers: locations, server types with their
price list, and images, in the JSON shapes the `hcloud` library parses."""

from __future__ import annotations

from typing import Any

CREATED = "2026-12-02T12:00:00+00:00"  # every object's creation time

LOCATIONS = {
    name: {
        "id": i,
        "name": name,
        "description": desc,
        "country": country,
        "city": city,
        "latitude": 50.0,
        "longitude": 12.0,
        "network_zone": zone,
    }
    for i, (name, desc, country, city, zone) in enumerate(
        [
            ("fsn1", "Falkenstein DC Park 1", "DE", "Falkenstein", "eu-central"),
            ("nbg1", "Nuremberg DC Park 1", "DE", "Nuremberg", "eu-central"),
            ("hel1", "Helsinki DC Park 1", "FI", "Helsinki", "eu-central"),
        ],
        start=1,
    )
}


def _prices(monthly: str) -> list[dict[str, Any]]:
    return [
        {
            "location": name,
            "price_hourly": {"net": "0.0100", "gross": "0.0119"},
            "price_monthly": {"net": monthly, "gross": f"{float(monthly) * 1.19:.4f}"},
            "included_traffic": 21990232555520,
            "price_per_tb_traffic": {"net": "1.0000", "gross": "1.1900"},
        }
        for name in LOCATIONS
    ]


SERVER_TYPES = {
    name: {
        "id": i,
        "name": name,
        "description": name.upper(),
        "cores": cores,
        "memory": memory,
        "disk": disk,
        "deprecated": False,
        "deprecation": None,
        "prices": _prices(monthly),
        "storage_type": "local",
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "cost_optimized",
        "locations": [
            {
                "id": loc["id"],
                "name": loc["name"],
                "deprecation": None,
                "available": True,
                "recommended": True,
            }
            for loc in LOCATIONS.values()
        ],
    }
    for i, (name, cores, memory, disk, monthly) in enumerate(
        [("cx22", 2, 4.0, 40, "3.7900"), ("cx32", 4, 8.0, 80, "6.8000")], start=101
    )
}

IMAGES = {
    name: {
        "id": i,
        "type": "system",
        "status": "available",
        "name": name,
        "description": name,
        "image_size": None,
        "disk_size": 5,
        "created": CREATED,
        "created_from": None,
        "bound_to": None,
        "os_flavor": name.split("-")[0],
        "os_version": name.split("-")[1],
        "rapid_deploy": True,
        "protection": {"delete": False},
        "deprecated": None,
        "labels": {},
        "deleted": None,
        "architecture": "x86",
    }
    for i, name in enumerate(["debian-12", "debian-13", "ubuntu-24.04"], start=201)
}
