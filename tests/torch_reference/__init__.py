"""PyTorch transcriptions of the reference modules, used only by parity tests."""
