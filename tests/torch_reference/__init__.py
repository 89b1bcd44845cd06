"""PyTorch transcriptions of the reference modules, for parity tests only."""
