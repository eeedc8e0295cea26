"""Preference data: corpora, testbed labels, loading/validation and collation."""
