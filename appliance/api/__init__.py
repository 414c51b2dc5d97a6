"""API stage: the Sanic REST API, `appliance serve`.

`app` (the factory and the command), `routes` (the handlers), `models` (request parameters and
responses as msgspec Structs), `exports` (CSV, JSON lines, Parquet), `openapi` (the document and
/docs), `http` (JSON errors, request ids, CORS, access log). Everything it answers comes from
`appliance.query`.
"""
