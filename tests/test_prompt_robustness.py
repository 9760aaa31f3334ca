"""The prompt_robustness check: cross-checked on the demo model, known answers on a toy text model."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from mcaudit import InputError, ModelAdapter
from mcaudit.context import AuditContext
from mcaudit.forward import ForwardOutputs
from mcaudit.plugins.checks import prompt_robustness as pr
from mcaudit.plugins.checks.prompt_robustness import PromptRobustnessCheck
from mcaudit.prompts import PromptSet
from mcaudit.testing import load_adapter, make_context, phantom_dataset, run_cli

from mcaudit.testing import derive_status


def run_check(ctx, **given):
    return PromptRobustnessCheck().run(ctx, PromptRobustnessCheck.resolve_params(given))


class NoImagePasses:
    """Fails the test if the image encoder runs."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = self.model.encode_image
        self.model.encode_image = self._boom
        return self

    def __exit__(self, *exc):
        self.model.encode_image = self.saved

    @staticmethod
    def _boom(*args, **kwargs):
        raise AssertionError("prompt_robustness ran the image encoder")


@pytest.fixture(scope="module")
def demo_ctx():
    return make_context(load_adapter("demo"), phantom_dataset(120, seed=4))


def test_template_accuracy_matches_sklearn_without_image_passes(demo_ctx):
    with NoImagePasses(demo_ctx.model):
        result = run_check(demo_ctx, max_candidates=16)
    prompts, classes = demo_ctx.prompts, demo_ctx.classes
    feats = demo_ctx.forward.image_features
    labels = demo_ctx.forward.labels
    table = {row[0]: row[1] for row in result.tables[0].rows}
    assert set(table) == set(prompts.templates)
    for template in prompts.templates:
        with torch.inference_mode():
            text = demo_ctx.model.class_text_features([[template.format(w) for w in prompts.phrasings[c]] for c in classes])
        expected = accuracy_score(labels, (feats @ text.T).argmax(1).numpy())
        assert table[template] == pytest.approx(expected)
    m = result.metrics
    assert m["ensemble_accuracy"] == pytest.approx(accuracy_score(labels, demo_ctx.forward.preds))
    assert m["template_accuracy.worst"] == pytest.approx(min(table.values()))
    assert m["template_accuracy_spread"] == pytest.approx(max(table.values()) - min(table.values()))
    # the demo model's text tower barely depends on the wording: nothing to flag
    assert m["prompt_attack.accuracy_drop"] < 0.05 and not result.warnings
    status, reason, outcomes, _ = derive_status(PromptRobustnessCheck, result)
    one_edit = next(o for o in outcomes.values() if o["metric"] == "one_edit_accuracy_drop")
    assert one_edit["status"] == "pass" and status == "pass", reason
    assert len(result.per_image["correct_worst_template"]) == len(demo_ctx.forward)
    # accuracies are counts over the same images: a drop is a whole number of images, exactly
    n = len(demo_ctx.forward)
    assert m["prompt_attack.accuracy_drop"] * n == pytest.approx(round(m["prompt_attack.accuracy_drop"] * n), abs=1e-9)


# -- a toy CLIP whose text tower is a bag of hashed words that understands negation ---------
DIM = 64


def word_vector(word: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    return torch.randn(DIM, generator=g)


class BagOfWordsAdapter(ModelAdapter):
    """Text features: the sum of hashed word vectors, negated after "no". No image tower."""

    def __init__(self):
        super().__init__(spec="bag-of-words", image_size=(8, 8), mean=[0.5] * 3, std=[0.25] * 3)

    def _encode_normalized_image(self, images):
        raise AssertionError("the toy model has no image tower")

    def _encode_prompts(self, prompts):
        out = []
        for prompt in prompts:
            sign, total = 1.0, torch.zeros(DIM)
            for word in prompt.lower().replace(".", " ").split():
                if word == "no":
                    sign = -1.0
                    continue
                total += sign * word_vector(word)
            out.append(total)
        return torch.stack(out)

    @property
    def logit_scale(self) -> float:
        return 100.0


TOY_TEMPLATES = ("a chest x-ray showing {}.", "a radiograph with {}.", "no sign of {}.")


TOY_PHRASINGS = {"normal": ["clear lungs"], "opacity": ["a focal opacity"]}


def toy_context(n: int = 200, noise: float = 0.9, seed: int = 0, templates=TOY_TEMPLATES, phrasings=None) -> AuditContext:
    """Image features near the class text features of the first two (honest) templates."""
    model = BagOfWordsAdapter()
    prompts = PromptSet(tuple(templates), dict(phrasings or TOY_PHRASINGS))
    classes = ["normal", "opacity"]
    honest = model.class_text_features([[t.format(w) for t in TOY_TEMPLATES[:2] for w in prompts.phrasings[c]] for c in classes])
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    feats = honest[labels] + noise * torch.as_tensor(rng.normal(size=(n, DIM)), dtype=torch.float32) / np.sqrt(DIM)
    feats = torch.nn.functional.normalize(feats, dim=-1)
    dataset = phantom_dataset(n, seed=1, groups=())
    dataset.classes = classes
    class_features = model.class_text_features(prompts.class_prompts(classes))
    forward = ForwardOutputs(indices=np.arange(n), labels=labels, image_features=feats,
                             logits=model.logit_scale * feats @ class_features.T, grey=np.ones(n, dtype=bool))
    return AuditContext(model=model, dataset=dataset, prompts=prompts, class_features=class_features,
                        forward=forward, device=torch.device("cpu"))


def test_planted_negation_template_is_the_worst():
    ctx = toy_context()
    result = run_check(ctx, levels=[])
    table = {row[0]: row[1] for row in result.tables[0].rows}
    m = result.metrics
    assert m["ensemble_accuracy"] > 0.75
    assert table["no sign of {}."] == pytest.approx(m["template_accuracy.worst"])
    assert table["no sign of {}."] < 0.25  # the negated template swaps the classes
    assert min(table["a chest x-ray showing {}."], table["a radiograph with {}."]) > 0.85
    assert any("depends strongly on the template" in w for w in result.warnings)


def test_typos_and_synonyms_lower_accuracy_of_a_wording_sensitive_model(tmp_path):
    ctx = toy_context(noise=1.4, templates=TOY_TEMPLATES[:2])
    shipped = run_check(ctx, char_budget=2, word_budget=1, max_candidates=200)
    extra = tmp_path / "syn.toml"
    extra.write_text('groups = [["focal opacity", "clear lungs"]]\n')  # a planted, meaning-swapping "synonym"
    extended = run_check(ctx, char_budget=2, word_budget=1, max_candidates=200, synonyms=str(extra))
    m = extended.metrics
    base = m["ensemble_accuracy"]
    assert base > 0.95
    # two typos in a word the toy model hashes whole destroy that word's contribution
    assert m["prompt_attack.char.worst_accuracy"] < base - 0.3
    char_rows = [r for r in extended.tables[1].rows if r[1] == "char"]
    assert all(1 <= len(r[2].split("; ")) <= 2 for r in char_rows)
    # the user's list extends the shipped one, and its planted entry is the worst substitution found
    word = {r[0]: r for r in extended.tables[1].rows if r[1] == "word"}
    assert word["normal"][2] == "'clear lungs' -> 'focal opacity'" and word["normal"][4] == "focal opacity"
    assert m["prompt_attack.word.worst_accuracy"] < 0.7
    assert shipped.metrics["prompt_attack.word.worst_accuracy"] > m["prompt_attack.word.worst_accuracy"] + 0.15
    assert not any("focal opacity'" in r[2] for r in shipped.tables[1].rows)
    assert m["prompt_attack.accuracy_drop"] == pytest.approx(base - m["prompt_attack.worst_accuracy"])
    assert any("Small prompt edits change the result" in w for w in extended.warnings)


def brute_force_worst(ctx, class_index: int, edits: list[pr.Edit]) -> float:
    feats, labels = ctx.forward.image_features, ctx.forward.labels
    phrasings = [list(ctx.prompts.phrasings[c]) for c in ctx.classes]
    worst = 1.0
    for edit in edits:
        changed = [list(p) for p in phrasings]
        changed[class_index][edit.phrasing] = edit.text
        text = ctx.model.class_text_features([[t.format(w) for w in ws for t in ctx.prompts.templates] for ws in changed])
        worst = min(worst, accuracy_score(labels, (feats @ text.T).argmax(1).numpy()))
    return worst


def test_greedy_single_edit_finds_the_brute_force_worst():
    ctx = toy_context(n=120, noise=1.1, seed=2, templates=TOY_TEMPLATES[:2])
    result = run_check(ctx, char_budget=1, word_budget=1, max_candidates=10_000)
    m = result.metrics
    synonyms = pr.synonym_map(pr.load_synonym_groups())
    for k, name in enumerate(ctx.classes):
        text = ctx.prompts.phrasings[name][0]
        assert m[f"prompt_attack.char.accuracy.{name}"] == pytest.approx(
            min(m["ensemble_accuracy"], brute_force_worst(ctx, k, pr.char_edits(text, 0))))
        word = pr.word_edits(text, 0, synonyms)
        if word:
            assert m[f"prompt_attack.word.accuracy.{name}"] == pytest.approx(
                min(m["ensemble_accuracy"], brute_force_worst(ctx, k, word)))


def test_edit_generators_and_synonym_list():
    edits = {e.text for e in pr.char_edits("lung", 0)}
    assert {"ung", "lng", "ulng", "lugn", "kung"} <= edits
    assert "lung" not in edits
    syn = pr.synonym_map(pr.load_synonym_groups())
    assert "consolidation" in syn["opacity"] or "opacification" in syn["opacity"]
    assert all(term in syn[alt] for term, alts in syn.items() for alt in alts)  # symmetric
    words = {e.text for e in pr.word_edits("A focal Opacity.", 0, syn)}
    assert "A focal density." in words and "A localised Opacity." in words
    assert not pr.word_edits("opacityx", 0, {"opacity": ["density"]})  # whole words only


def test_bad_parameters_are_input_errors(tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("groups = [\"not a list of lists\"]\n")
    for given in (dict(levels=["sentence"]), dict(char_budget=-1), dict(max_candidates=0),
                  dict(synonyms=str(tmp_path / "missing.toml")), dict(synonyms=str(bad_toml))):
        with pytest.raises(InputError, match="prompt_robustness"):
            PromptRobustnessCheck.resolve_params(given)  # before the model loads


def test_same_seed_same_result_and_cli_report(tmp_path):
    ctx = toy_context(n=60)
    a, b = run_check(ctx, max_candidates=8), run_check(ctx, max_candidates=8)
    assert a.metrics == b.metrics and a.details == b.details
    out = run_cli(["run", "--quiet", "-p", "mcaudit.plugins.checks.prompt_robustness", "--checks", "prompt_robustness",
                   "--data", "phantom:n=60", "--model", "demo", "--set", "prompt_robustness.max_candidates=8"],
                  tmp_path / "out")
    assert out.exit_code == 0, out.output
    check = out.results["checks"]["prompt_robustness"]
    # the demo model barely depends on the wording: every default threshold is met
    assert check["execution"] == "completed" and check["status"] == "pass", check["status_reason"]
    assert check["counts"]["ensemble_accuracy"][1] == check["sample_size"] == 60
    assert "Accuracy per template" in out.html and "Worst prompt edits found" in out.html


# -- the default verdict: a one-edit drop threshold with a paired interval ---------------------
def one_edit_difference(ctx, result) -> np.ndarray:
    """Per image: correct with the audited prompts minus correct after the reported single edit,
    recomputed from the edited phrasing with the adapter's own class_text_features."""
    worst = min(result.details["attacks"], key=lambda a: a["one_edit_accuracy"])
    assert len(worst["edits"]) == 1  # budget 1: the reported phrasing is the one-edit phrasing
    edited = [list(ctx.prompts.phrasings[c]) for c in ctx.classes]
    edited[ctx.classes.index(worst["class"])] = list(worst["perturbed"])
    text = ctx.model.class_text_features([[t.format(w) for w in ws for t in ctx.prompts.templates] for ws in edited])
    after = (ctx.forward.image_features @ text.T).argmax(1).numpy()
    labels = ctx.forward.labels
    return (ctx.forward.preds == labels).astype(float) - (after == labels).astype(float)


def test_one_typo_in_the_word_that_tells_classes_apart_fails_by_default():
    # The bag-of-words model hashes whole words, so one typo in "lung"/"lungs" (the only word
    # that differs between the classes) makes that class's description noise.
    ctx = toy_context(n=200, noise=0.9, templates=TOY_TEMPLATES[:2], phrasings={"normal": ["clear lung"], "opacity": ["clear lungs"]})
    result = run_check(ctx, char_budget=1, word_budget=0, max_candidates=500)
    m = result.metrics
    assert m["ensemble_accuracy"] > 0.95
    diff = one_edit_difference(ctx, result)
    assert m["one_edit_accuracy_drop"] == pytest.approx(diff.mean()) and diff.mean() > 0.4
    lo, hi = result.intervals["one_edit_accuracy_drop"]
    assert 0.05 < lo <= m["one_edit_accuracy_drop"] <= hi
    status, reason, outcomes, entry = derive_status(PromptRobustnessCheck, result)
    assert status == "fail"
    assert "one edit accuracy drop" in reason and "needs <= 0.05" in reason, reason
    assert PromptRobustnessCheck.threshold_reasons["one_edit_accuracy_drop"]
    assert entry["sample_size"] == 200
    assert entry["counts"]["ensemble_accuracy"] == [round(m["ensemble_accuracy"] * 200), 200]
    # the summary states the drop, without reassuring words
    assert "one edit (" in result.summary and "lowers it to" in result.summary


def test_a_wording_robust_prompt_set_is_not_failed():
    """Images lie far from either description's noise: one typo moves few of them, if any."""
    ctx = toy_context(n=200, noise=0.3, templates=TOY_TEMPLATES[:2],
                      phrasings={"normal": ["clear lungs", "no focal opacity", "normal lungs"],
                                 "opacity": ["a focal opacity", "a lung nodule", "an opacity"]})
    result = run_check(ctx, char_budget=1, word_budget=1, max_candidates=500)
    assert result.metrics["one_edit_accuracy_drop"] <= 0.02
    status, reason, outcomes, _ = derive_status(PromptRobustnessCheck, result)
    assert next(o for o in outcomes.values() if o["metric"] == "one_edit_accuracy_drop")["status"] == "pass"
    assert status != "fail", reason


def test_no_edit_searched_is_not_evaluated_never_pass():
    ctx = toy_context(n=60)
    result = run_check(ctx, levels=[])
    assert "one_edit_accuracy_drop" not in result.metrics
    assert "no single edit was scored" in result.not_evaluated["one_edit_accuracy_drop"]
    _, _, outcomes, _ = derive_status(PromptRobustnessCheck, result)
    assert next(o for o in outcomes.values() if o["metric"] == "one_edit_accuracy_drop")["status"] == "not_evaluated"


def test_paired_interval_matches_scipy_bootstrap_and_resamples_patients():
    from scipy.stats import bootstrap

    ctx = toy_context(n=200, noise=1.4, templates=TOY_TEMPLATES[:2])
    result = run_check(ctx, char_budget=1, word_budget=0, max_candidates=200, n_bootstrap=4000)
    diff = one_edit_difference(ctx, result)
    labels = ctx.forward.labels
    assert result.metrics["one_edit_accuracy_drop"] == pytest.approx(diff.mean())
    assert diff.mean() > 0.1
    ref = bootstrap((diff,), np.mean, n_resamples=20000, method="percentile", random_state=0).confidence_interval
    lo, hi = result.intervals["one_edit_accuracy_drop"]
    assert lo == pytest.approx(ref.low, abs=0.015) and hi == pytest.approx(ref.high, abs=0.015)

    # every image twice under one patient id: resampling patients gives the interval of the
    # images once, where resampling images would treat the copies as independent evidence
    twice = toy_context(n=200, noise=1.4, templates=TOY_TEMPLATES[:2])
    twice.forward.image_features = torch.cat([ctx.forward.image_features] * 2)
    twice.forward.labels = np.concatenate([labels] * 2)
    twice.forward.indices = np.arange(400)
    twice.forward.logits = torch.cat([ctx.forward.logits] * 2)
    twice.clusters = lambda rows=None: np.tile(np.arange(200), 2)[rows if rows is not None else slice(None)]
    clustered = run_check(twice, char_budget=1, word_budget=0, max_candidates=200, n_bootstrap=4000)
    c_lo, c_hi = clustered.intervals["one_edit_accuracy_drop"]
    assert clustered.metrics["one_edit_accuracy_drop"] == pytest.approx(diff.mean())
    assert (c_hi - c_lo) == pytest.approx(hi - lo, rel=0.15)
    twice.clusters = lambda rows=None: None
    naive = run_check(twice, char_budget=1, word_budget=0, max_candidates=200, n_bootstrap=4000)
    n_lo, n_hi = naive.intervals["one_edit_accuracy_drop"]
    assert (n_hi - n_lo) < 0.85 * (c_hi - c_lo)


def test_profiles_size_the_search():
    quick, standard = (PromptRobustnessCheck.resolve_params(PromptRobustnessCheck.profile_params(p)) for p in ("quick", "standard"))
    thorough = PromptRobustnessCheck.resolve_params(PromptRobustnessCheck.profile_params("thorough"))
    assert quick["max_candidates"] < standard["max_candidates"] < thorough["max_candidates"]
    # plain defaults are the standard profile
    assert PromptRobustnessCheck.resolve_params({}) == standard
