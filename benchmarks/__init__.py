"""The mtlopt benchmark suite."""
