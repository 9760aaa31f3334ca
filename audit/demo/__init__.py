"""The embedded demo: a tiny open_clip model and the synthetic phantoms it was trained on.

``open_clip_config.json`` and ``open_clip_model.safetensors`` in this folder use the same
layout as BiomedCLIP's hub folder; ``scripts/train_demo.py`` regenerates the weights from a
seed.
"""
