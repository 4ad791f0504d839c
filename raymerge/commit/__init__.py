"""Phase 4, commit: turn finished items into a checkpoint, manifest last."""
