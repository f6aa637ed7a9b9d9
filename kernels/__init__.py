"""Pure tensor functions used by the model: attention over a paged KV cache and KV-cache writes.

Nothing here imports the server. Each kernel has a torch reference; `kernels.attention` is the dispatch point.
"""
