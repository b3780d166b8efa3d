"""The P/D handoff: its timeline, and the fast path that takes it out of the first token."""
