"""Memory-budget profiling: measure an increment's peak memory, estimate it from the
architecture, and plan a configuration that fits a budget (`fieldlearn profile`)."""
