"""Adapters that run lookahead's drafting inside other serving engines (optional dependencies)."""
