"""Pure tensor functions used by the model: attention over a paged KV cache and KV-cache writes.

Nothing here imports the rest of loraserve. Each kernel has a torch reference; `attention` is the dispatch point.
"""
