"""Pure tensor operations shared by the steps (no module walking, no I/O)."""
