"""Phase 3, execute: a pool of plain worker classes on Ray produces the plan's items."""
