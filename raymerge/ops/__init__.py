"""The arithmetic: torch lives here and in the workers, nowhere below."""
