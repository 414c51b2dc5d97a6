"""pyinfra roles: one package per component, each exposing `@deploy` functions with typed
keyword arguments. Roles read nothing from `host.data`; `deploys/site.py` passes values in."""
