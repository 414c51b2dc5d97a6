"""Build the Grafana dashboards in monitoring/dashboards/ from their short definitions in
monitoring/dashboard_defs/ (one module per dashboard).

Run `python monitoring/build_dashboards.py` after changing a panel and commit the JSON it writes;
a test keeps the committed files equal to this output. Every panel reads the provisioned
datasource (uid appliance-prometheus); `$instance` selects the host.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The definitions live beside this script (monitoring/dashboard_defs/), however it is loaded.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from dashboard_defs import api, host, pipeline, storage  # noqa: E402

OUT = HERE / "dashboards"
DASHBOARDS = {
    "pipeline": pipeline.BOARD,
    "storage": storage.BOARD,
    "api": api.BOARD,
    "host": host.BOARD,
}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, board in DASHBOARDS.items():
        (OUT / f"{name}.json").write_text(render(board))
    print(f"wrote {len(DASHBOARDS)} dashboards to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
