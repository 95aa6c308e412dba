"""`lora-sdpo export RUN --format gguf`: read back with transformers' own GGUF reader (gguf-py
underneath), against the run's M_t in safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CLI_OUTPUTS, FAKE_TOKEN, ROOT

EVAL = ROOT / "data" / "ultrafeedback" / "eval_clean.jsonl"


def _invoke(*args):
    from click.testing import CliRunner

    from lora_sdpo.cli import main

    res = CliRunner().invoke(main, list(args), env={"HF_TOKEN": FAKE_TOKEN, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    CLI_OUTPUTS.append(res.output)
    return res


@pytest.fixture(scope="module")
def sample_ids(two_step_run):
    """1000 token positions of held-out answers, tokenised by the run's own tokenizer."""
    tok = AutoTokenizer.from_pretrained(two_step_run / "step-2" / "model")
    text = "\n".join(json.loads(line)["chosen"] for line in EVAL.read_text().splitlines()[:6])
    return tok(text, return_tensors="pt").input_ids[:, :1000]


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits[0]


def test_f16_export_layout_logits_tokenizer_and_chat_template(two_step_run, tmp_path, sample_ids):
    out = tmp_path / "gguf"
    res = _invoke("export", str(two_step_run), "--output", str(out), "--format", "gguf")
    assert res.exit_code == 0, res.output
    assert "exported step 2 (GGUF, f16)" in res.output
    marker = json.loads((out / "export.json").read_text())
    assert set(marker["files"]) == {"model-f16.gguf", "Modelfile", "README.md", "recipe.toml"}
    assert marker["what"] == "gguf" and marker["dtype"] == "f16"
    card = (out / "README.md").read_text()
    assert "llama-cli -m model-f16.gguf" in card and "ollama create" in card and 'gguf_file="model-f16.gguf"' in card
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile

    res = _invoke("push", str(out), "--repo-id", "someone/sdpo-gguf", "--dry-run")  # contacts nobody
    assert res.exit_code == 0, res.output
    assert all(f in res.output for f in ("model-f16.gguf", "Modelfile", "README.md", "export.json"))

    m2 = two_step_run / "step-2" / "model"
    tok = AutoTokenizer.from_pretrained(m2)
    gtok = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    # The reader reproduces the embedded chat template, and what it renders.
    assert gtok.chat_template == tok.chat_template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert gtok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (gtok.eos_token, gtok.bos_token, gtok.pad_token) == (tok.eos_token, tok.bos_token, tok.pad_token)
    text = "\n".join(json.loads(line)["prompt"] for line in EVAL.read_text().splitlines()[:3])
    assert gtok(text).input_ids == tok(text).input_ids  # the merges travel in the file

    reference = AutoModelForCausalLM.from_pretrained(m2, dtype=torch.float32)
    expected = _logits(reference, sample_ids)
    for p in reference.parameters():  # what f16 storage should give: the 2-D weights rounded to float16
        if p.dim() > 1:
            p.data = p.data.half().float()
    rounded = _logits(reference, sample_ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32), sample_ids)
    assert float((got - rounded).abs().max()) <= 1e-4  # the file holds exactly the rounded weights (measured 0)
    assert float((got - expected).abs().max()) <= 2**-10 * float(expected.abs().max())  # half-precision tolerance


def test_q8_0_export_agrees_on_the_top_token(two_step_run, tmp_path, sample_ids):
    out = tmp_path / "q8"
    res = _invoke("export", str(two_step_run), "--output", str(out), "--format", "gguf", "--quant", "q8_0", "--step", "1")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "export.json").read_text())["dtype"] == "q8_0"
    reference = AutoModelForCausalLM.from_pretrained(two_step_run / "step-1" / "model", dtype=torch.float32)
    expected = _logits(reference, sample_ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out, gguf_file="model-q8_0.gguf", dtype=torch.float32), sample_ids)
    agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    assert agree >= 0.99, agree  # measured 0.997 (0.990 with the LM head in q8_0 too)


def test_gguf_refusals(two_step_run, tmp_path):
    from lora_sdpo.gguf_export import GGUFError, check_architecture

    with pytest.raises(GGUFError, match="this one is Qwen2ForCausalLM"):
        check_architecture({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, tmp_path)
    with pytest.raises(GGUFError, match="rope_type 'llama3'"):
        check_architecture({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "llama3"},
                            "hidden_size": 8, "num_attention_heads": 2}, tmp_path)
    res = _invoke("export", str(two_step_run), "--output", str(tmp_path / "a"), "--format", "gguf", "--what", "adapter")
    assert res.exit_code == 2 and "--what adapter is written as safetensors only" in res.output
    assert not (tmp_path / "a").exists()


def test_vocab_kinds_and_scores(tmp_path):
    """The tokenizer as written (no llama.cpp needed; tests/test_gguf_llama_cpp.py reads it with llama.cpp)."""
    import gguf

    from conftest import MODEL
    from lora_sdpo.gguf_export import GGUFError, _pre_tokenizer_kind, _vocab

    tj = json.loads((MODEL / "tokenizer.json").read_text())
    v = _vocab(MODEL, 32064)
    assert (v["model"], v["pre"], v["space_prefix"]) == ("llama", "default", False)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]
    rank = merges.index(("▁", "▁"))
    assert rank > 61_000 and v["scores"][259] == -rank  # "▁▁" (id 259) is made by one of the last merges
    assert v["scores"][tj["model"]["vocab"]["▁t"]] == 0.0  # the first merge
    assert v["types"][13] == gguf.TokenType.BYTE and v["types"][32010] == gguf.TokenType.CONTROL  # <0x0A>, <|user|>
    assert v["tokens"][32063] == b"[PAD32063]" and v["types"][32063] == gguf.TokenType.UNUSED

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    bpe = {"model": {"type": "BPE"}, "normalizer": None}
    assert _pre_tokenizer_kind(tmp_path, {**bpe, "pre_tokenizer": byte_level}) == ("gpt2", "gpt-2")
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert _pre_tokenizer_kind(tmp_path, {**bpe, "pre_tokenizer": smollm}) == ("gpt2", "smollm")
    llama3 = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "..."}}, byte_level]}
    with pytest.raises(GGUFError, match="is not one the GGUF export writes"):
        _pre_tokenizer_kind(tmp_path, {**bpe, "pre_tokenizer": llama3})
    with pytest.raises(GGUFError, match="is not one the GGUF export writes"):
        _pre_tokenizer_kind(tmp_path, {"model": {"type": "WordPiece"}, "pre_tokenizer": {"type": "BertPreTokenizer"}})
