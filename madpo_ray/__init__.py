"""madpo-ray."""
