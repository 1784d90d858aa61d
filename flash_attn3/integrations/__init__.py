"""Adapters that plug flash_attn3 into other libraries (imported on demand, so they cost nothing otherwise)."""
