"""Capturing site inputs and statistics, whole-model or one decoder layer at a time."""
