"""attnc.runtime: the attention ops and their backends.

`ops` is the op (validation, autograd, torch.compile, the backend choice); the
backends are `torch_backend` (with `schedules`, `key_ranges` and `tile_choice`), `triton_backend`,
`flex` and `dense` (the oracle); `decode` serves cached decoding and `distributed`
context parallelism. Users reach all of it through `attnc.BoundPattern`.
"""

#: the package's modules (nothing is re-exported: import `attnc.runtime.<module>`)
__all__ = ["backend", "decode", "dense", "distributed", "flex", "key_ranges", "ops", "registry", "schedules", "tile_choice",
           "torch_backend", "triton_backend", "validate"]
