"""The lake: listing sources, fingerprints and the diff, the Delta table, the run lock."""
