"""normcore's HTTP service: named norm layers behind FastAPI and the KServe V2 protocol."""

__version__ = "0.1.0"
