"""Document/summary corpora: the generated default and the Debian builder."""
