"""Built-in model loaders: open_clip (architectures, checkpoints, hub folders) and transformers CLIP."""
