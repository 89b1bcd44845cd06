"""numpy transcriptions of the reference's data handling, for tests only."""
