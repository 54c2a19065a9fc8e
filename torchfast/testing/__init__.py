"""Test-only helpers shipped with torchfast (the CUDA emulator's Python face)."""
