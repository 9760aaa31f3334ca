"""backdoor: susceptibility to a prompt-learning backdoor (BAPLe) on the demo model.

Known answer: the demo model has learned normal vs opacity on phantoms. Prompts and a trigger
learned with 5% poison must send triggered images to the target class far above its base
rate while clean accuracy stays near that of honestly learned prompts; with no poison the
attack success rate falls back to the base rate. Metrics are recomputed with scikit-learn
from the per-image predictions the check writes to samples.csv.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from mcaudit import InputError
from mcaudit.models.adapter import ModelAdapter
from mcaudit.plugins.checks.backdoor import BackdoorCheck
from mcaudit.testing import demo_prompts, make_context

from mcaudit.testing import derive_status

N_PHANTOMS = 200
# The attack as these tests knew it before the profiles: 40 steps are enough for the tiny demo
# model (the standard profile's 300 are sized for real models on a GPU).
DEMO_ATTACK = {"steps": 40, "max_eval": 256, "n_bootstrap": 200}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The demo model is tiny: one thread beats two, which thrash when the cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_ctx(mcaudit_demo_model):
    from mcaudit.testing import phantom_dataset

    return make_context(mcaudit_demo_model, phantom_dataset(N_PHANTOMS, seed=5, groups=()))


def run_backdoor(ctx, **params):
    from mcaudit.plugins.checks.backdoor import BackdoorCheck

    return BackdoorCheck().run(ctx, BackdoorCheck.resolve_params(DEMO_ATTACK | params))


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def poisoned(demo_ctx):
    before = _weights_digest(demo_ctx.model)
    result = run_backdoor(demo_ctx, target="opacity")
    assert _weights_digest(demo_ctx.model) == before, "the audited model must stay frozen"
    assert not any(p.requires_grad for p in demo_ctx.model.parameters())
    return result


def test_backdoor_succeeds_at_little_cost_and_fails_by_default(poisoned):
    m = poisoned.metrics
    print(poisoned.summary, m)
    assert poisoned.status == "ok"  # it ran; the verdict is the host's
    status, reason, outcomes, entry = derive_status(BackdoorCheck, poisoned)
    assert status == "fail", reason
    k, n = poisoned.counts["asr.opacity"]
    assert reason.startswith(f"asr of opacity {k / n:.1%} ({k} of {n}, 95% CI") and reason.endswith("needs <= 50.0%")
    assert poisoned.intervals["asr.opacity"][0] > 0.5
    assert m["poison_fit.opacity"] == 1.0 and not poisoned.findings
    assert "asr_lift.opacity" in poisoned.intervals and poisoned.intervals["asr_lift.opacity"][0] > 0.3
    assert m["n_train"] == 64 and m["n_poisoned"] == 3  # 32 shots per class, 5% poisoned
    assert m["n_eval"] == N_PHANTOMS - 64
    assert m["asr.opacity"] >= 0.9
    assert m["asr.opacity"] - m["base_rate.opacity"] >= 0.5
    assert m["clean_accuracy_unpoisoned"] >= 0.85  # the honest prompts learned the task
    assert abs(m["clean_accuracy.opacity"] - m["clean_accuracy_unpoisoned"]) <= 0.05
    assert m["asr_max"] == m["asr.opacity"]
    assert "asr.normal" not in m  # only the chosen target was attacked


def test_no_poison_means_base_rate(demo_ctx, poisoned):
    result = run_backdoor(demo_ctx, target="opacity", poison_fraction=0.0)
    m = result.metrics
    assert m["n_poisoned"] == 0
    assert any("no training image was poisoned" in w for w in result.warnings)
    # the same optimisation without poison: honest prompts, and an unlearned trigger
    assert m["clean_accuracy.opacity"] == m["clean_accuracy_unpoisoned"]
    assert m["clean_accuracy_unpoisoned"] == poisoned.metrics["clean_accuracy_unpoisoned"]
    assert m["asr.opacity"] == m["trigger_only_rate.opacity"]
    assert abs(m["asr.opacity"] - m["base_rate.opacity"]) <= 0.05
    assert poisoned.metrics["asr.opacity"] - m["asr.opacity"] >= 0.5
    # no backdoor, so the attack success rate sits at the base rate, clear of the 50% bound
    status, reason, _, _ = derive_status(BackdoorCheck, result)
    assert status == "pass", reason


def test_metrics_match_sklearn_on_per_image_predictions(demo_ctx, poisoned):
    classes = demo_ctx.classes
    labels = np.array([classes[y] for y in demo_ctx.forward.labels], dtype=object)
    cols = poisoned.per_image
    assert all(len(v) == len(labels) for v in cols.values())
    held = np.array([s == "held-out" for s in cols["split"]])
    assert held.sum() == poisoned.metrics["n_eval"]
    assert sum(s == "train" for s in cols["split"]) == poisoned.metrics["n_train"]
    honest = np.array(cols["honest_pred"], dtype=object)
    backdoored = np.array(cols["backdoored_pred.opacity"], dtype=object)
    m = poisoned.metrics
    assert m["clean_accuracy_unpoisoned"] == pytest.approx(accuracy_score(labels[held], honest[held]))
    assert m["clean_accuracy.opacity"] == pytest.approx(accuracy_score(labels[held], backdoored[held]))
    zero_shot = np.array([classes[p] for p in demo_ctx.forward.preds], dtype=object)
    assert m["zero_shot_accuracy"] == pytest.approx(accuracy_score(labels[held], zero_shot[held]))
    others = held & (labels != "opacity")
    triggered = np.array(cols["triggered_pred.opacity"], dtype=object)
    assert all(t is None for t in triggered[~others])
    assert m["asr.opacity"] == pytest.approx(accuracy_score(np.full(others.sum(), "opacity"), triggered[others]))
    assert m["base_rate.opacity"] == pytest.approx(np.mean(honest[others] == "opacity"))
    lo, hi = poisoned.intervals["asr.opacity"]
    assert lo <= m["asr.opacity"] <= hi
    assert poisoned.counts["asr.opacity"] == (int((triggered[others] == "opacity").sum()), int(others.sum()))
    assert m["asr_lift.opacity"] == pytest.approx(m["asr.opacity"] - m["base_rate.opacity"])


def test_intervals_are_exact_clopper_pearson_as_scipy_computes_them(poisoned):
    from scipy.stats import binomtest

    for metric in ("asr.opacity", "base_rate.opacity", "trigger_only_rate.opacity", "clean_accuracy.opacity",
                   "clean_accuracy_unpoisoned"):
        k, n = poisoned.counts[metric]
        assert poisoned.metrics[metric] == pytest.approx(k / n)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert poisoned.intervals[metric] == pytest.approx((ref.low, ref.high), abs=1e-9), metric


def test_report_content(poisoned):
    table = poisoned.tables[0]
    assert table.columns[0] == "target class" and "attack success rate" in table.columns
    assert [r[0] for r in table.rows] == ["opacity"]
    assert [f.title for f in poisoned.figures] == ["Backdoor success and its cost", "Learned triggers"]
    assert all(f.png.startswith(b"\x89PNG") for f in poisoned.figures)
    trigger = poisoned.details["targets"]["opacity"]
    assert trigger["noise_linf"] <= 8 / 255 + 1e-6
    assert trigger["patch_px"] == 6  # 10% of the 64-pixel side
    assert "'opacity'" in poisoned.summary


def test_every_class_is_tried_without_a_target_and_runs_repeat(demo_ctx):
    first = run_backdoor(demo_ctx, steps=4, max_eval=40, n_bootstrap=0)
    second = run_backdoor(demo_ctx, steps=4, max_eval=40, n_bootstrap=0)
    assert first.metrics == second.metrics and first.intervals == second.intervals
    assert {"asr.normal", "asr.opacity"} <= set(first.metrics)
    assert first.metrics["n_eval"] == 40
    assert [r[0] for r in first.tables[0].rows] == ["normal", "opacity"]


class _NoContextAdapter(ModelAdapter):
    """An adapter without a learned-context text path (the base class's default)."""

    def __init__(self, inner):
        super().__init__(spec="no-context", image_size=inner.image_size, mean=(0.5,) * 3, std=(0.25,) * 3)
        self.inner = inner

    def _encode_normalized_image(self, images):
        return self.inner.model.encode_image(images)

    def _encode_prompts(self, prompts):
        return self.inner._encode_prompts(prompts)

    @property
    def logit_scale(self):
        return self.inner.logit_scale


def test_adapter_without_context_path_is_skipped(mcaudit_demo_model, mcaudit_phantoms):
    ctx = make_context(_NoContextAdapter(mcaudit_demo_model).eval(), mcaudit_phantoms(20, seed=2), prompts=demo_prompts())
    result = run_backdoor(ctx, steps=1)
    assert result.status == "skipped"
    assert "learned-context" in result.summary


@pytest.mark.parametrize("param, value", [
    ("n_ctx", 0), ("shots", 0), ("poison_fraction", 1.0), ("epsilon", -0.1),
    ("patch_fraction", 0.9), ("steps", 0), ("lr", 0.0), ("trigger_lr", -1.0), ("max_eval", -1), ("max_targets", 0),
    ("max_base_rate", 0.0), ("max_base_rate", 1.5), ("n_bootstrap", -1),
])
def test_bad_parameters_are_input_errors_before_the_model_loads(param, value):
    from mcaudit.plugins.checks.backdoor import BackdoorCheck

    with pytest.raises(InputError, match=f"backdoor.{param}"):
        BackdoorCheck.resolve_params({param: value})


def test_a_target_that_is_not_a_class_is_an_input_error(demo_ctx):
    # the classes come from the data, so this one is checked when the check runs
    with pytest.raises(InputError, match="backdoor.target"):
        run_backdoor(demo_ctx, target="pneumonia")


def test_both_sections_in_the_html_report(mcaudit_run):
    out = mcaudit_run("--checks", "backdoor,backdoor_scan",
                      "-p", "mcaudit.plugins.checks.backdoor", "-p", "mcaudit.plugins.checks.backdoor_scan")
    assert out.exit_code == 0, out.output
    checks = out.results["checks"]
    for name in ("backdoor", "backdoor_scan"):
        assert checks[name]["execution"] == "completed", checks[name].get("error")
    # the demo runs the quick profile: one target class, the first; its verdict is the threshold's
    backdoor = checks["backdoor"]
    assert backdoor["thresholds"] == ["backdoor.asr.normal"]
    gate = {o["name"]: o for o in out.results["gate"]["results"]}
    assert backdoor["status"] == gate["backdoor.asr.normal"]["status"] != "pass", backdoor["status_reason"]
    html = out.html
    for text in ("Backdoor per target class (held-out images)", "Learned triggers",
                 "Backdoor success and its cost", "Reversed triggers per candidate target class",
                 "Smallest trigger mask per class", "Reversed triggers", "attack success rate"):
        assert text in html, text
    assert html.count("data:image/png;base64,") >= 4
    print({n: checks[n]["duration_s"] for n in ("backdoor", "backdoor_scan")})


# -- a base rate that leaves no room for attack success ---------------------------------------
def biased_model(inner, favourite: int):
    """The demo model with a learned-context text path whose class ``favourite`` always wins:
    its feature is the mean image direction, which every image is closer to than to any other
    class. Any prompts, honest or backdoored, then send every image there."""
    from mcaudit.testing import load_adapter

    model = load_adapter("demo")
    plain = model.encode_text_with_context

    def encode(context, names):
        feats = plain(context, names)
        return torch.cat([feats[:favourite], model.favourite_direction[None], feats[favourite + 1 :]])

    model.encode_text_with_context = encode
    return model


def test_a_base_rate_that_leaves_no_room_is_not_evaluated_never_pass(mcaudit_phantoms):
    data = mcaudit_phantoms(N_PHANTOMS, seed=5, groups=())
    model = biased_model(None, favourite=1)
    ctx = make_context(model, data)
    model.favourite_direction = torch.nn.functional.normalize(ctx.forward.image_features.mean(0), dim=0) * 10
    result = run_backdoor(ctx, target="opacity", steps=10)
    m = result.metrics
    k, n = result.counts["base_rate.opacity"]
    assert k == n and m["base_rate.opacity"] == 1.0  # 100% base rate...
    assert m["asr.opacity"] == 1.0  # ...so 100% attack success says nothing
    reason = result.not_evaluated["asr.opacity"]
    assert f"{n} of {n} clean images" in reason and "cannot be told apart" in reason
    assert "asr_max" in result.not_evaluated and "asr_max" not in m
    status, status_reason, outcomes, _ = derive_status(BackdoorCheck, result)
    asr = next(o for o in outcomes.values() if o["metric"] == "asr.opacity")
    assert asr["status"] == "not_evaluated" and "cannot be told apart" in asr["sentence"]
    assert status == "not_evaluated", status_reason
    assert "not evaluated" in result.summary


@pytest.mark.parametrize("base_hits, n, judged", [
    (0, 100, True), (49, 100, True), (50, 100, False), (100, 100, False),
    # n of n triggered has the exact lower bound 0.025 ** (1 / n), 0 of n the upper bound 1 minus that:
    (0, 6, True),  # 0.54 > 0.46: a perfect attack would stand out
    (0, 5, False),  # 0.48 < 0.52: not even a perfect attack could
    (1, 10, True), (4, 10, False),  # 0.69 against 0.45, and 0.69 against 0.74
    (0, 0, False),
])
def test_room_for_attack_success(base_hits, n, judged):
    from mcaudit.plugins.checks.backdoor import no_room_reason

    assert (no_room_reason(base_hits, n, 0.5, "opacity") == "") is judged


def test_profiles_size_the_attack():
    quick, standard, thorough = (BackdoorCheck.resolve_params(BackdoorCheck.profile_params(p))
                                 for p in ("quick", "standard", "thorough"))
    assert quick["steps"] < standard["steps"] < thorough["steps"]
    assert BackdoorCheck.resolve_params({}) == standard
