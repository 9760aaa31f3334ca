"""Built-in audit plugins, one module each, registered exactly as third-party plugins are."""
