"""Wire formats <-> tensors and values: the JSON tensor codec, the KServe V2 codec and
vocabulary, content codings, and the JSON views of the engine's results."""
