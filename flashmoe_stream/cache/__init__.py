"""See ARCHITECTURE.md; filled in by later issues."""
