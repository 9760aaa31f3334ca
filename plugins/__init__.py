"""Every built-in plugin: checks, model loaders, data formats and output formats, registered
exactly as third-party plugins are (see docs/architecture.md)."""
