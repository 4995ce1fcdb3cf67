"""Text for a run: where documents come from and how they become disjoint token windows.

``sources`` loads documents (pydoc, a text file, ``hf:`` datasets) and ``splits`` divides them
into calibration / selection / held-out / evaluation splits by whole document and cuts token
windows. Import from those modules directly; nothing is re-exported here, so each name has one
home.
"""
