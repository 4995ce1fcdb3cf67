"""Everything that touches disk: atomic writes, scales files, exports, loading and verifying."""
