"""razor-vllm: RazorAttention (Tang et al., arXiv 2407.15891, ICLR 2025) inside vLLM.

Retrieval heads (found offline and data-free by `razor-vllm profile`) keep the full KV cache; every
other KV head keeps a few sink tokens, a recent window, and one compensation token (the mean of the
evicted post-RoPE keys and values).

This module stays import-light: vLLM loads `razor_vllm.vllm.plugin` in every process it starts.
"""

__version__ = "0.1.0"
