"""API stage: the Sanic REST API (`app`, `appliance serve`) and its request/response models.

Everything it answers comes from `appliance.query`.
"""
