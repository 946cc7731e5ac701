"""KServe V2 over gRPC (``inference.GRPCInferenceService``): a transport like
``service.http``, served by the same process and engine. The only package that loads
grpc; ``service.app`` imports it only when a gRPC port is set."""
