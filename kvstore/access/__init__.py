"""The access layer: authentication, tenant isolation and per-client limits in front of the service."""
