"""The reference checkpoint (the public model the audited one was fine-tuned from): which one,
and loading it the way ``--model`` is loaded."""

from __future__ import annotations

from pathlib import Path

from mcaudit import InputError


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
    # the host's loader: it knows the -p plugins and --allow-network, as --model does
    model = ctx.load_model(spec, checkpoint or None)
    if model is None:
        raise InputError(f"backdoor_scan.reference_model {spec}: no loader claims this spec")
    if tuple(model.image_size) != tuple(ctx.model.image_size):
        raise InputError(f"backdoor_scan.reference_model {spec}: image size {tuple(model.image_size)} differs from "
                         f"the audited model's {tuple(ctx.model.image_size)}")
    return model.to(ctx.device).eval()
