"""Package data: the lark grammar of the .attn language (attn.lark)."""
