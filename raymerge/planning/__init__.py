"""Phases 1 and 2: resolve inputs from their headers, then plan the output as pure data."""
