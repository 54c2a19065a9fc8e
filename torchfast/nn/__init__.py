"""Drop-in layers (torchfast.nn) and utilities."""
