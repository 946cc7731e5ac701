"""The service's logic apart from any transport: the engine, the layer catalog, dynamic
batching, device names and the exceptions that say what went wrong."""
