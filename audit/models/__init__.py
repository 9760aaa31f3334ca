"""Model adapters and the built-in model loaders."""
