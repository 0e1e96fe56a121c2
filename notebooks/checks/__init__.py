"""Check functions for the course chapters' exercises, one module per chapter (chNN.py)."""
