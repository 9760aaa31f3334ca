"""Train the embedded demo model on synthetic phantoms and write its weights.

    python scripts/train_demo.py [--seed 0] [--out audit/demo]

The model is a tiny open_clip ViT (see audit/demo/open_clip_config.json) trained with the
zero-shot objective: images against one randomly drawn caption per class, built from the demo
prompts, so both towers learn.
Site C is rare in training (5%), which, with its noisier scanner, plants the site effect
that the fairness audit is meant to find. Weights are stored as fp16 safetensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mcaudit.demo.phantoms import render_phantom
from mcaudit.plugins.loaders.openclip import build_model, make_tokenizer
from mcaudit.prompts import load_prompts

TRAIN_SITE_WEIGHTS = (0.5, 0.45, 0.05)


def make_images(seed: int, n: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    from mcaudit.data.dataset import to_model_size
    from mcaudit.data.images import to_rgb

    imgs, labels = [], []
    for i in range(n):
        img, attrs = render_phantom(seed, i, site_weights=TRAIN_SITE_WEIGHTS)
        imgs.append(to_model_size(to_rgb(img)[0], (size, size)))
        labels.append(attrs["label"])
    return torch.stack(imgs), np.array(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="audit/demo")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--warmup-epochs", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = json.loads((out / "open_clip_config.json").read_text())
    cfg = config["model_cfg"]
    mean = torch.tensor(config["preprocess_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["preprocess_cfg"]["std"]).view(1, 3, 1, 1)
    model = build_model(cfg, None)
    tokenizer = make_tokenizer(cfg, None)
    prompts = load_prompts(out / "prompts.toml")
    captions = [prompts.prompts_for(c) for c in prompts.classes]
    tokens = [tokenizer(c) for c in captions]

    size = cfg["vision_cfg"]["image_size"]
    t0 = time.time()
    images, labels = make_images(args.seed + 1000, args.n, size)
    print(f"rendered {len(images)} phantoms in {time.time() - t0:.1f}s")
    gen = torch.Generator().manual_seed(args.seed)
    # A tiny ViT trained from scratch stalls at chance with warm-up schedules and weight
    # decay; a constant rate that decays linearly over the last third learns reliably.
    # An auxiliary linear head on the image features gets the image tower past the plateau
    # where both class captions still embed alike; it is thrown away after training.
    head = torch.nn.Linear(cfg["embed_dim"], len(tokens))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=5e-4, weight_decay=0.0)
    steps = args.epochs * (len(images) // 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 3.0 * (1 - s / steps)))
    model.train()
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(images), generator=gen)
        total = 0.0
        for b in range(len(images) // 64):
            idx = perm[b * 64 : (b + 1) * 64]
            x = images[idx]
            if torch.rand(1, generator=gen).item() < 0.5:
                x = x.flip(-1)  # the phantom is left-right symmetric but for the heart
            y = torch.as_tensor(labels[idx.numpy()])
            # one random caption per class this step: the text tower learns every phrasing
            pick = torch.randint(0, tokens[0].shape[0], (len(tokens),), generator=gen)
            if epoch < args.warmup_epochs:
                pick.zero_()  # one fixed caption per class until the image tower finds the signal
            text = torch.stack([tokens[c][int(p)] for c, p in enumerate(pick)])
            raw = model.encode_image((x - mean) / std)
            img_f = F.normalize(raw, dim=-1)
            txt_f = F.normalize(model.encode_text(text), dim=-1)
            logits = model.logit_scale.exp() * img_f @ txt_f.T
            loss = F.cross_entropy(logits, y) + F.cross_entropy(head(raw), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            total += loss.item()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / (len(images) // 64):.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"seed": str(args.seed), "trainer": "scripts/train_demo.py"})
    print(f"wrote {out / 'open_clip_model.safetensors'}")


if __name__ == "__main__":
    main()
