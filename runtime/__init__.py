"""attnc.runtime: the attention ops (validation, backends, reference)."""
