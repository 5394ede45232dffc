"""Bridges to other multi-task libraries."""
