"""Helpers that convert/, runtime/, cli/ and bench/ share: atomic file writes (files.py), this process's
resources (system.py: threads, peak RSS) and every operating-system and C++ ABI assumption (platform.py).
It imports neither convert nor runtime."""
