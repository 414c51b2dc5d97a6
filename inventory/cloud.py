"""The machine that drives the Hetzner Cloud API: this one (pyinfra's @local connector).

    HCLOUD_TOKEN=... pyinfra inventory/cloud.py deploys/provision.py

Provisioning runs here, not over SSH; it reads the same group_data (inventory/group_data/all.py:
the hcloud_* values, appliance_name, admin_ssh_addresses) as the site deploy.
"""

cloud = ["@local"]
