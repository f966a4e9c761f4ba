"""The engine: the model, the MoE layer, the KV cache, continuous batching, sampling,
tokenization, loading."""
