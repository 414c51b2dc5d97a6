"""Every tunable of the site deploy, with its default. Override per host in the inventory
(`("203.0.113.10", {"domain": "posts.example.org"})`) or in a group_data file of your own.

Secrets are not here: see deploys/data.py (DEPLOY_SECRET_<NAME> variables or the git-ignored
inventory/secrets/ folder; absent ones are generated once and kept on the host).
"""

# Labels the Hetzner resources and names the services' Grafana folder.
appliance_name = "bluesky-appliance"

# --- storage ---------------------------------------------------------------------------------
# Where the data volume is mounted; Parquet under <data_root>/data, the Redis AOF under
# <data_root>/redis. The volume itself: Hetzner shows it as /dev/disk/by-id/scsi-0HC_Volume_<id>.
# Empty keeps the data on the system disk (a test or a throwaway host only).
data_root = "/srv/appliance"
volume_device = ""

# --- services ---------------------------------------------------------------------------------
redis_port = 6379
redis_maxmemory = "2gb"  # of a 4 GiB cx22: the buffer holds ~3.5M events at ~575 B each
api_port = 8080
api_workers = 2
ingest_port = 9101
batch_port = 9102
jetstream_urls = [
    "wss://jetstream1.us-east.bsky.network/subscribe",
    "wss://jetstream2.us-east.bsky.network/subscribe",
    "wss://jetstream1.us-west.bsky.network/subscribe",
    "wss://jetstream2.us-west.bsky.network/subscribe",
]
# Any other APPLIANCE_* setting (see `appliance config -v`), e.g. {"APPLIANCE_BATCH_INTERVAL_S": "300"}.
appliance_settings: dict[str, str] = {}

# --- the front door -----------------------------------------------------------------------------
# With a domain, Caddy gets a Let's Encrypt certificate for it (its DNS must point at the host).
# Without one, Caddy serves HTTPS with its own internal CA for site_addresses (default: the
# inventory name of the host).
domain = ""
acme_email = ""
site_addresses: list[str] = []
max_request_body = "1MB"

# --- access ---------------------------------------------------------------------------------
# Addresses or networks allowed to SSH in. Required: the deploy refuses an empty list.
admin_ssh_addresses: list[str] = []
ssh_port = 22

# --- monitoring ---------------------------------------------------------------------------------
prometheus_retention = "30d"
# Where alerts go: {"kind": "none"} | {"kind": "webhook", "webhook_url": "https://..."} |
# {"kind": "email", "email_to": ..., "email_from": ..., "smarthost": "smtp.example.org:587",
#  "smtp_username": ...}. The SMTP password (or a webhook URL with a token) is the secret
# alert_credential.
alert_receiver = {"kind": "none"}
grafana_enabled = True
# Grafana's apt signing key, pinned: the key downloaded at deploy time must have this fingerprint.
grafana_apt_key_fingerprint = "B53AE77BADB630A683046005963FA27710458545"

# --- the code ---------------------------------------------------------------------------------
# Built on the operator's machine by `make wheelhouse` and uploaded; the host needs no index.
wheelhouse = "dist/wheelhouse"
keep_releases = 3
apt_cache_time = 3600
