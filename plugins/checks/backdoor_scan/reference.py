"""The reference checkpoint (the public model the audited one was fine-tuned from): which one,
and loading it the way ``--model`` is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mcaudit import InputError, ModelRequest


def load_reference(ctx, params: dict):
    """The reference model on the run's device, in eval mode; None without one.

    The parameters name it (the host fills them from ``--reference-model`` unless they are set).
    """
    spec, checkpoint = params["reference_model"], params["reference_checkpoint"]
    if not spec:
        if checkpoint:
            raise InputError("backdoor_scan.reference_checkpoint needs backdoor_scan.reference_model")
        return None
    if checkpoint and not Path(checkpoint).is_file():
        raise InputError(f"backdoor_scan.reference_checkpoint {checkpoint}: no such file")
    model = model_loader(ctx)(spec, checkpoint or None)
    if model is None:
        raise InputError(f"backdoor_scan.reference_model {spec}: no loader claims this spec")
    if tuple(model.image_size) != tuple(ctx.model.image_size):
        raise InputError(f"backdoor_scan.reference_model {spec}: image size {tuple(model.image_size)} differs from "
                         f"the audited model's {tuple(ctx.model.image_size)}")
    return model.to(ctx.device).eval()


def model_loader(ctx) -> Callable:
    """``(spec, checkpoint) -> model or None``: the host's own loader where it gave one, since it
    knows the ``-p`` plugins and ``--allow-network``; the built-in loaders otherwise."""
    if ctx.model_loader is not None:
        return ctx.load_model
    # A host may hand its loader over in the options instead.
    given = (ctx.options or {}).get("load_model")
    if given is not None:
        return given
    return lambda spec, checkpoint: load_with_built_in_loaders(ctx, spec, checkpoint)


def load_with_built_in_loaders(ctx, spec: str, checkpoint: str | None):
    """For a context built without a loader (``mcaudit.testing.make_context``): the built-in
    loaders asked in the order the host asks them, the later registered first."""
    from mcaudit.plugins.loaders import hf_clip, openclip

    request = ModelRequest(checkpoint=Path(checkpoint) if checkpoint else None, device=str(ctx.device),
                           precision=ctx.precision, allow_network=bool((ctx.options or {}).get("allow_network")))
    for loader in (hf_clip, openclip):
        model = loader.mcaudit_load_model(spec=spec, request=request)
        if model is not None:
            return model
    return None
