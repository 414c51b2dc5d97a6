"""/docs works offline: the page and every file it loads come from the appliance itself."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from importlib import resources

from tests.test_api import Api, api  # noqa: F401 - the fixture

_REFS = re.compile(r"""(?:src|href)="([^"]+)"|url:\s*"([^"]+)\"""")


def test_docs_and_every_asset_it_references_load_from_the_appliance(
    api: Callable[..., Api],  # noqa: F811
) -> None:
    a = api()
    page = a.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = [m.group(1) or m.group(2) for m in _REFS.finditer(page.text)]
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(refs)
    assert "/openapi.json" in refs
    assert "validatorUrl: null" in page.text  # Swagger UI would fetch a badge from its site
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), f"{ref} is not on the appliance"
        response = a.get(ref)
        assert response.status_code == 200, ref
        assert response.content, ref
    bundle = a.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in bundle.content
    assert "max-age" in bundle.headers["cache-control"]
    assert a.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert "Apache License" in a.get("/docs/assets/LICENSE").text
    missing = a.get("/docs/assets/../../openapi.py")
    assert missing.status_code == 404
    assert a.get("/docs/assets/index.html").status_code == 404
    assert a.get("/docs/assets/SOURCE.txt").status_code == 404  # only the listed files


def test_the_vendored_swagger_ui_files_match_their_recorded_checksums() -> None:
    folder = resources.files("appliance.api").joinpath("swagger_ui")
    source = folder.joinpath("SOURCE.txt").read_text()
    assert "swagger-ui-dist, version 5.35.0" in source
    sums = dict(
        reversed(line.split()) for line in source.split("sha256:\n", 1)[1].splitlines() if line
    )
    assert set(sums) >= {"swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"}
    for name, digest in sums.items():
        assert hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest() == digest, name
