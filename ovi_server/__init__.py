"""ovi-server: a self-hosted, fal-compatible inference server for Ovi."""

__version__ = "0.1.0"
