"""Raw Aff-Wild2 layout to the per-trial feature cache."""
