"""Verification side: one forward over a draft tree, acceptance, KV-cache compaction."""
