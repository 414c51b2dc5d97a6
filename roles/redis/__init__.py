"""Redis from Debian, running the appliance's own redis.conf (the template `appliance up`
renders too): AOF on the data volume, noeviction, a password, loopback only."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import apt, files, systemd

from appliance.redis_server import render_template
from roles.ops import beside, secret_file

CONFIG = "/etc/redis/redis.conf"
PACKAGES = ["redis-server", "redis-tools"]
DROPIN = "/etc/systemd/system/redis-server.service.d/appliance.conf"


def redis_conf(*, port: int, password: str, directory: str, maxmemory: str) -> str:
    """Our redis.conf for the host: the packaged template, bound to loopback."""
    return render_template(
        "redis.conf",
        {
            "bind": "127.0.0.1 -::1",
            "port": port,
            "password": password,
            "dir": directory,
            "maxmemory": maxmemory,
        },
    )


@deploy("Set up Redis")
def redis(*, port: int, password: str, directory: str, maxmemory: str, mount_point: str) -> None:
    apt.packages(name="Install redis-server", packages=PACKAGES, no_recommends=True)
    files.directory(
        name=f"Keep Redis's AOF on the data volume, in {directory}",
        path=directory,
        user="redis",
        group="redis",
        mode="750",
    )
    config = secret_file(
        name="Write our redis.conf (it holds the password, so it is never printed)",
        dest=CONFIG,
        content=redis_conf(port=port, password=password, directory=directory, maxmemory=maxmemory),
        user="redis",
        group="redis",
        mode="640",
    )
    dropin = files.template(
        name="Let the Redis unit write to the data volume, and wait for it",
        src=beside(__file__, "redis-server.dropin.j2"),
        dest=DROPIN,
        mode="644",
        directory=directory,
        mount_point=mount_point,
    )
    systemd.service(
        name="Run redis-server, restarted only when its configuration changed",
        service="redis-server",
        running=True,
        enabled=True,
        daemon_reload=dropin.will_change,
        restarted=config.will_change or dropin.will_change,
    )
