"""The benchmark harness: FA Pool against its baselines and the physical floor."""
