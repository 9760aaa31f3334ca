"""Neural Cleanse's trigger inversion: per candidate class, the smallest mask and pattern that
send clean images of the other classes to it, optimised for all classes and restarts at once
until each converges."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NORM_TOL = 0.01  # a mask counts as smaller only when it shrinks by more than 1%


def invert_triggers(ctx, classifier: nn.Module, candidates: np.ndarray, rows: np.ndarray,
                    size: tuple[int, int], channels: int, params: dict) -> dict:
    """Smallest (mask, pattern) per candidate class, optimised until it converges.

    Every class gets ``restarts`` slots, all optimised in one batch; a slot stops once its
    trigger reaches ``target_asr`` and its mask has not shrunk by NORM_TOL for ``patience``
    steps, or at ``max_steps``. Per class the smallest mask of a slot that reached the
    target is kept.
    """
    slot_class = np.repeat(np.arange(len(candidates)), params["restarts"])  # slot -> position in candidates
    inversion = _Inversion(ctx, classifier, candidates[slot_class], rows, size, channels, params)
    state = _SlotState(len(slot_class), size, channels, params, ctx.device)
    for _ in range(params["max_steps"]):
        if not bool(state.active.any()):
            break
        inversion.step(state)
    mask, pattern = inversion.triggers()
    return state.best_per_class(slot_class, len(candidates), mask, pattern, inversion.n_valid)


class _Inversion:
    """Every slot's mask and pattern, and the (slot, image) pairs they are optimised on."""

    def __init__(self, ctx, classifier: nn.Module, slot_target: np.ndarray, rows: np.ndarray,
                 size: tuple[int, int], channels: int, params: dict):
        device = ctx.device
        self.ctx, self.classifier = ctx, classifier
        k = self.k = len(slot_target)
        h, w = size
        gen = ctx.torch_generator("backdoor_scan:init")
        # Masks start small (about 10% opacity) with some spread, patterns at random; tanh keeps both in [0, 1].
        mask_init = float(np.arctanh(2 * 0.1 - 1)) + 0.5 * torch.randn(k, 1, h, w, generator=gen)
        self.mask_param = nn.Parameter(mask_init.to(device))
        self.pattern_param = nn.Parameter((torch.randn(k, channels, h, w, generator=gen) * 0.5).to(device))
        self.opt = torch.optim.Adam([self.mask_param, self.pattern_param], lr=params["lr"], betas=(0.5, 0.9))
        self.pixels = ctx.load_pixels(rows)
        labels = ctx.forward.labels[rows]
        # Only images of other classes are stamped: those of the candidate class teach nothing.
        pair_slot, pair_image = np.nonzero(labels[None, :] != slot_target[:, None])
        self.pair_slot = torch.as_tensor(pair_slot, device=device)
        self.pair_image = torch.as_tensor(pair_image, device=device)
        self.pair_target = torch.as_tensor(slot_target[pair_slot], device=device)
        self.n_valid = torch.bincount(self.pair_slot, minlength=k).float().clamp_min(1)
        self.chunk = max(1, ctx.batch_size)

    def triggers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _squash(self.mask_param).detach(), _squash(self.pattern_param).detach()

    def step(self, state: "_SlotState") -> None:
        """One Adam step of the active slots: attack loss in chunks of pairs, then the size penalty."""
        active_pairs = state.active[self.pair_slot]
        self.opt.zero_grad(set_to_none=True)
        hits = torch.zeros(self.k, device=self.ctx.device)
        pk_all, pi_all = self.pair_slot[active_pairs], self.pair_image[active_pairs]
        tgt_all = self.pair_target[active_pairs]
        for start in range(0, len(pk_all), self.chunk):
            pk, pi, tgt = (t[start : start + self.chunk] for t in (pk_all, pi_all, tgt_all))
            mask, pattern = _squash(self.mask_param), _squash(self.pattern_param)
            stamped = (1 - mask[pk]) * self.pixels[pi] + (mask * pattern)[pk]
            with self.ctx.autocast():
                logits = self.classifier(stamped).float()
            ce = nn.functional.cross_entropy(logits, tgt, reduction="none")
            (ce / self.n_valid[pk]).sum().backward()
            hits.index_add_(0, pk, (logits.argmax(dim=-1) == tgt).float().detach())
        mask = _squash(self.mask_param)
        area = mask.flatten(1).mean(dim=1)
        (state.cost * area * state.active).sum().backward()
        with torch.no_grad():
            state.update(hits, self.n_valid, mask.detach(), _squash(self.pattern_param).detach())
        self.opt.step()


class _SlotState:
    """Best trigger so far, convergence and Neural Cleanse's cost schedule, per slot."""

    UP, DOWN = 1.5, 1.5**1.5  # Neural Cleanse's cost multipliers

    def __init__(self, k: int, size: tuple[int, int], channels: int, params: dict, device):
        self.params = params
        # As in Neural Cleanse, no size penalty until a slot first succeeds: find a trigger, then shrink it.
        self.cost = torch.zeros(k, device=device)
        self.pushed = torch.zeros(k, dtype=torch.bool, device=device)  # the penalty has once beaten the attack
        self.above = torch.zeros(k, dtype=torch.long, device=device)
        self.below = torch.zeros(k, dtype=torch.long, device=device)
        self.best_norm = torch.full((k,), float("inf"), device=device)
        self.best_hits = torch.zeros(k, device=device)
        self.best_mask = torch.zeros(k, 1, *size, device=device)
        self.best_pattern = torch.zeros(k, channels, *size, device=device)
        self.anchor = torch.full((k,), float("inf"), device=device)  # norm at the last clear improvement
        self.stale = torch.zeros(k, dtype=torch.long, device=device)
        self.steps = torch.zeros(k, dtype=torch.long, device=device)
        self.active = torch.ones(k, dtype=torch.bool, device=device)
        self.converged = torch.zeros(k, dtype=torch.bool, device=device)

    def update(self, hits, n_valid, mask, pattern) -> None:
        p = self.params
        act = self.active
        ok = (hits / n_valid >= p["target_asr"]) & act
        norm = mask.flatten(1).sum(dim=1)
        better = ok & (norm < self.best_norm)
        # Measured from the last clear improvement, so that a slow creep of 0.5% a step still counts.
        clearly = ok & (norm < self.anchor * (1 - NORM_TOL))  # inf * 0.99 is inf: a first success counts
        reached = torch.isfinite(self.best_norm) | ok
        self.best_norm = torch.where(better, norm, self.best_norm)
        self.anchor = torch.where(clearly, norm, self.anchor)
        self.best_hits = torch.where(better, hits, self.best_hits)
        self.best_mask[better] = mask[better]
        self.best_pattern[better] = pattern[better]
        self.stale = torch.where(clearly, torch.zeros_like(self.stale), torch.where(reached & act, self.stale + 1, self.stale))
        self.steps += act.long()
        self.cost = torch.where(ok & (self.cost == 0), torch.full_like(self.cost, p["init_cost"]), self.cost)
        # Neural Cleanse's schedule: a class that keeps succeeding pays more for its mask.
        self.above = torch.where(ok, self.above + 1, torch.zeros_like(self.above))
        self.below = torch.where(ok | ~act, torch.zeros_like(self.below), self.below + 1)
        raise_cost = self.above >= p["cost_patience"]
        lower_cost = self.below >= p["cost_patience"]
        self.cost = torch.where(raise_cost, self.cost * self.UP, torch.where(lower_cost, self.cost / self.DOWN, self.cost))
        self.above = torch.where(raise_cost, torch.zeros_like(self.above), self.above)
        self.below = torch.where(lower_cost, torch.zeros_like(self.below), self.below)
        # Converged: the penalty has been strong enough to push the attack below target at least
        # once (so the mask sits where size and success trade off, not on an early plateau), and
        # the mask has since stopped shrinking.
        self.pushed |= lower_cost & reached
        done = act & reached & self.pushed & (self.stale >= p["patience"])
        self.converged |= done
        self.active &= ~done

    def best_per_class(self, slot_class: np.ndarray, n_classes: int, final_mask, final_pattern, n_valid) -> dict:
        """Per class, the slot with the smallest mask that reached the target (converged first)."""
        reached = torch.isfinite(self.best_norm).cpu().numpy()
        converged = self.converged.cpu().numpy()
        best = self.best_norm.cpu().numpy()
        final = final_mask.flatten(1).sum(dim=1).cpu().numpy()
        keep = np.zeros(n_classes, dtype=int)
        for c in range(n_classes):
            slots = np.flatnonzero(slot_class == c)
            # a converged slot beats an unfinished one; among equals the smaller mask wins
            key = [(not converged[s], not reached[s], best[s] if reached[s] else final[s]) for s in slots]
            keep[c] = slots[min(range(len(slots)), key=key.__getitem__)]
        keep_t = torch.as_tensor(keep, device=self.best_norm.device)
        got = torch.as_tensor(reached[keep], device=keep_t.device)[:, None, None, None]
        masks = torch.where(got, self.best_mask[keep_t], final_mask[keep_t])
        patterns = torch.where(got, self.best_pattern[keep_t], final_pattern[keep_t])
        slot_norms = np.where(reached, best, final)
        return {
            "masks": masks, "patterns": patterns,
            "norms": masks.flatten(1).sum(dim=1).cpu().numpy().astype(float),
            "reached": reached[keep], "converged": converged[keep],
            "steps": self.steps.cpu().numpy()[keep],
            "opt_hits": self.best_hits.cpu().numpy()[keep].round().astype(int),
            "opt_trials": n_valid.cpu().numpy()[keep].round().astype(int),
            "restart_norms": [slot_norms[slot_class == c].astype(float).tolist() for c in range(n_classes)],
            "cost": self.cost.cpu().numpy()[keep],
        }


def _squash(param: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(param) + 1) / 2
