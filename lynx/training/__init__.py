"""Training the Lynx adapters: `prepare` a cache from a manifest, then `train` on it (docs/training.md)."""
