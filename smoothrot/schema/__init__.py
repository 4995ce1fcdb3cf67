"""Typed, serializable configuration and declarations; torch-free so CLIs can import them."""
