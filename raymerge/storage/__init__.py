"""Bytes at offsets: range reads from any fsspec URL, and writers for local files and S3.

Nothing here knows about plans, tensors or checkpoints.
"""
