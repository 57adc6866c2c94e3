"""Data-plane worker processes and their supervisor (the control side)."""
