"""Tools beside the library: benchmarks and checks a user runs from the command line (``dcase-kit``)."""
