"""Files in and out: videos, their sidecar records, and writes that never leave half a file."""
