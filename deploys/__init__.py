"""pyinfra entry deploys: `site.py` configures a host over SSH (provisioning is a separate run)."""
