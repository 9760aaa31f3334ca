"""Built-in audit checks: one module each, or a package for a check that needs several."""
