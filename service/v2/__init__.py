"""KServe V2 (Open Inference Protocol) for the service: datatypes and metadata
(``types``), request/response wire format with binary tensors (``codec``), and the
protocol's models for the OpenAPI schema (``schemas``). The router is ``service.api.v2``."""
