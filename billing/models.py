"""Usage events and rollups for finance (filled by the billing work)."""
