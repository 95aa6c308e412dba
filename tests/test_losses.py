"""TRL's DPO loss family through the recipe: at a step's first update the policy equals its reference
(the LoRA's B is zero), every log-ratio is 0, and each loss takes its value at zero margin.

The expected values are worked out here from each loss's formula (TRL 1.16, DPOTrainer._compute_loss)
at zero log-ratios; the two that depend on the model (sft, WPO weights) are computed from full logits
of the NF4 base, independently of lora-sdpo and of TRL's fused head. Each case builds its trainer from
lora-sdpo's own step configuration (trainer.dpo_config) and takes one optimizer update on 4 short pairs.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, set_seed

from conftest import MODEL, nf4, write_jsonl, write_recipe

LN2 = math.log(2)
EPS = 1e-3  # exo_pair's label smoothing (the EXO paper's value)


# Four short pairs (a few tokens each): the loss of one update is what is tested, and TRL's LM head
# on the CPU costs in proportion to the tokens.
TINY = [
    {"prompt": q, "chosen": c, "rejected": r}
    for q, c, r in [
        ("What is 2 + 2?", "2 + 2 = 4.", "It is 5."),
        ("Name a primary colour.", "Red is a primary colour.", "Green, I think."),
        ("Translate 'merci' into English.", "'Merci' means 'thank you'.", "It means 'goodbye'."),
        ("Is the sun a star?", "Yes, the sun is a star.", "No, it is a planet."),
    ]
]


def _token_stats(model, tok, prompt, completion, max_length):
    """Per-token log p and log sum_v p_v^2 of the completion's tokens (full logits, log_softmax)."""
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"][:max_length]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], dim=-1)
    tokens = logp.gather(1, ids[0, 1:, None])[:, 0][len(p) - 1 :]
    sum_sq = torch.logsumexp(2 * logp, dim=-1)[len(p) - 1 :]
    return tokens, sum_sq


@pytest.fixture(scope="module")
def losses_setup(tmp_path_factory):
    import datasets

    from lora_sdpo.data import normalise

    folder = tmp_path_factory.mktemp("losses")
    write_jsonl(folder / "tiny.jsonl", TINY)
    recipe = write_recipe(folder, folder, steps=("tiny.jsonl",))
    pairs = [normalise(r)[1] for r in TINY]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # One file and one cache for every case: TRL tokenises once and reuses the cached reference log-probs.
    dataset = datasets.load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train", cache_dir=str(folder / "cache"))
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    model = nf4(MODEL)
    chosen = [_token_stats(model, tok, p["prompt"], p["chosen"], 128) for p in pairs]
    rejected = [_token_stats(model, tok, p["prompt"], p["rejected"], 128) for p in pairs]
    del model
    # sft: mean negative log-likelihood over all chosen tokens of the batch (the 4 pairs are one batch)
    sft = -float(torch.cat([t for t, _ in chosen]).mean())
    # WPO: w = exp(mean over tokens of log p - log sum p^2), a pair weighted by w_chosen * w_rejected
    w = [math.exp(float((t - s).mean())) for t, s in chosen], [math.exp(float((t - s).mean())) for t, s in rejected]
    wpo = sum(a * b for a, b in zip(*w)) / len(pairs)
    return SimpleNamespace(recipe=recipe, folder=folder, dataset=dataset, tok=tok, sft=sft, wpo=wpo, n=len(pairs))


# (id, recipe overrides, zero-margin loss as a function of beta and the model-dependent values)
# sigmoid itself: ln 2 at every step of a real run, tests/test_invariants.py.
CASES = [
    ("hinge", ['training.loss_type="hinge"'], lambda b, s: 1.0),
    ("ipo", ['training.loss_type="ipo"', "training.beta=0.25"], lambda b, s: (1 / (2 * b)) ** 2),
    ("exo_pair", ['training.loss_type="exo_pair"', f"training.label_smoothing={EPS}"],
     lambda b, s: -LN2 - 0.5 * (math.log(1 - EPS) + math.log(EPS))),
    ("nca_pair", ['training.loss_type="nca_pair"'], lambda b, s: 2 * LN2),
    ("robust", ['training.loss_type="robust"', "training.label_smoothing=0.1"], lambda b, s: LN2),
    ("bco_pair", ['training.loss_type="bco_pair"'], lambda b, s: 2 * LN2),
    ("sppo_hard", ['training.loss_type="sppo_hard"'], lambda b, s: 2 * (0.5 / b) ** 2),
    ("aot", ['training.loss_type="aot"', "training.label_smoothing=0.2"], lambda b, s: LN2),
    ("aot_unpaired", ['training.loss_type="aot_unpaired"'], lambda b, s: LN2),
    ("apo_zero", ['training.loss_type="apo_zero"'], lambda b, s: 1.0),
    ("apo_down", ['training.loss_type="apo_down"'], lambda b, s: 1.0),
    ("discopop", ['training.loss_type="discopop"'], lambda b, s: 0.5 * LN2 + 0.5 * 1.0),
    ("sft", ['training.loss_type="sft"'], lambda b, s: s.sft),
    ("sigmoid_norm", ['training.loss_type="sigmoid_norm"'], lambda b, s: LN2),
    ("mpo", ['training.loss_type=["sigmoid", "bco_pair", "sft"]', "training.loss_weights=[0.8, 0.2, 1.0]"],
     lambda b, s: 0.8 * LN2 + 0.2 * 2 * LN2 + s.sft),
    ("ipo-alpha-divergence", ['training.loss_type="ipo"', 'training.f_divergence_type="alpha_divergence"', "training.beta=0.5"],
     lambda b, s: (1 / (2 * b)) ** 2),
    ("sigmoid-wpo", ["training.use_weighting=true"], lambda b, s: LN2 * s.wpo),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_first_loss_is_the_zero_margin_value(losses_setup, overrides, expected, tmp_path):
    from lora_sdpo.model import load_base, lora_config
    from lora_sdpo.recipe import load_recipe
    from lora_sdpo import pairs
    from lora_sdpo.step import reference_logps, reference_view
    from lora_sdpo.trainer import dpo_config
    from lora_sdpo.trl_compat import ResumableDPOTrainer, use_reference_logps

    s = losses_setup
    recipe = load_recipe(s.recipe, ["run.checkpoint_every=0", *overrides])
    t = recipe.recipe.training
    set_seed(recipe.recipe.run.seed)
    trainer = ResumableDPOTrainer(
        model=load_base(MODEL, recipe.adapter),
        args=dpo_config(recipe.step_settings(1), tmp_path / "trainer"),
        train_dataset=s.dataset,
        processing_class=s.tok,
        peft_config=lora_config(recipe.adapter),
    )
    # the reference pass as step.py runs it: the pair forward, the adapter off, handed to TRL as columns
    pairs.install(trainer.model.get_base_model(), enabled=t.prefix_sharing)
    with reference_view(trainer.model) as start:
        use_reference_logps(trainer, *reference_logps(trainer, start, 4, 1))
    # the recipe's loss reached TRL as written
    assert trainer.loss_types == t.losses
    assert trainer.loss_weights == (t.loss_weights or [1.0] * len(t.losses))
    assert (trainer.label_smoothing, trainer.f_divergence_type, trainer.use_weighting) == (t.label_smoothing, t.f_divergence_type, t.use_weighting)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 1 and trainer.state.global_step == 1  # one batch of the 4 pairs, one update
    want = expected(t.beta, s)
    assert abs(logs[0]["loss"] - want) < 1e-4 * max(1.0, want), (logs[0]["loss"], want)
    assert abs(logs[0]["rewards/margins"]) < 1e-5  # the zero margin the value relies on


def test_loss_settings_are_validated_with_close_matches(data_dir, tmp_path):
    from lora_sdpo.errors import RecipeError
    from lora_sdpo.recipe import load_recipe

    recipe = write_recipe(tmp_path, data_dir, steps=("orca.jsonl",))
    cases = [
        (['training.loss_type="sigmod"'], "did you mean 'sigmoid'?"),
        (['training.loss_type=["ipo", "hinge"]'], None),  # fine
        (["training.loss_weights=[1.0, 2.0]"], "loss_weights has 2 entries for 1 loss_type(s)"),
        (['training.loss_type="exo_pair"'], "needs label_smoothing > 0"),
        (["training.label_smoothing=0.1"], "has no effect on sigmoid"),
        (['training.loss_type="bco_pair"', 'training.f_divergence_type="js_divergence"'], "works only with"),
        (['training.loss_type="aot"', "training.use_weighting=true"], "does not work with aot"),
        (["training.ld_alpha=0.5"], "not offered yet"),
    ]
    for sets, message in cases:
        if message is None:
            load_recipe(recipe, sets)
            continue
        with pytest.raises(RecipeError) as e:
            load_recipe(recipe, sets)
        assert message in str(e.value), (sets, str(e.value))
        assert "training" in str(e.value)  # names the table or key
