"""pyinfra roles: one package per component, each exposing `@deploy` functions with typed
keyword arguments. Roles read nothing from `host.data`; `deploys/site.py` passes values in."""


def debian_packages() -> list[str]:
    """Every Debian package the roles install (the system test's offline apt repository)."""
    from roles import base, firewall, grafana, monitoring, proxy, redis

    modules = (base, firewall, redis, monitoring, grafana, proxy)
    return sorted({package for module in modules for package in module.PACKAGES})
