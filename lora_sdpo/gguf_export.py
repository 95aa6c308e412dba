"""`lora-sdpo export RUN --format gguf`: M_t as one GGUF file for llama.cpp and Ollama.

    EXPORT/
      NAME-QUANT.gguf   M_t (streamed from the run's float32 shards), the tokenizer, its special
                        tokens and the chat template embedded
      Modelfile         for `ollama create`
      README.md         model card: llama.cpp, Ollama, transformers
      recipe.toml       the recipe as run
      export.json       written last: the marker of a finished export, every file and its size

Written with the `gguf` library (gguf-py, llama.cpp's own): its writer, its tensor-name map for the
llama architecture (which llama.cpp also uses for Mistral) and `SpecialVocab` (special tokens, merges,
chat template). What convert_hf_to_gguf.py does beyond configuring these for Llama is done here the
same way: q_proj/k_proj rows are permuted to llama.cpp's rotary layout, 1-D tensors stay float32, the
vocabulary is padded to the embedding rows, the size label is written, and the tokenizer is written as
the converter writes a sentencepiece-style or a GPT-2-style BPE (_vocab; docs/export-and-push.md says
what llama.cpp b4965 reads from it, measured by tests/test_gguf_llama_cpp.py). Other architectures and
tokenizers are refused by name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import __version__
from .card import base_identity, base_license, gguf_card
from .errors import GGUFError
from .export import pick_step, read_run
from .merge import check_output
from .rundir import EXPORT_MARKER as MARKER, atomic_dir
from .shards import model_tensors, read_tensor

QUANTS = ("f16", "q8_0")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def check_architecture(config: dict, where: Path) -> None:
    """Refuse, by name, what this writer does not write exactly."""
    mt = config.get("model_type")
    arch = (config.get("architectures") or ["?"])[0]
    if mt not in ARCHITECTURES or arch != ARCHITECTURES[mt]:
        raise GGUFError(f"{where}: GGUF export writes Llama and Mistral models (LlamaForCausalLM, MistralForCausalLM); "
                        f"this one is {arch} (model_type {mt!r}). Export safetensors (the default format) and convert "
                        "it with llama.cpp's convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise GGUFError(f"{where}: rope_type {rope.get('rope_type', rope.get('type'))!r} is not written by the GGUF export "
                        "(default RoPE only); use llama.cpp's convert_hf_to_gguf.py on the safetensors export")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise GGUFError(f"{where}: {key} = true is not written by the GGUF export (Llama/Mistral without biases)")
    if config.get("head_dim") not in (None, config["hidden_size"] // config["num_attention_heads"]):
        raise GGUFError(f"{where}: head_dim {config['head_dim']} != hidden_size / num_attention_heads; not written by the GGUF export")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF's rotate-half layout of q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's
    # LlamaModel.permute; transformers' GGUF reader undoes exactly this).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # tokenizer.json holds merges as "a b" strings (older) or [a, b] lists (transformers >= 4.45).
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _pre_tokenizer_kind(model_dir: Path, tj: dict) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) for tokenizer.json, as llama.cpp's converter names them.

    Two kinds are written; anything else is refused by name rather than guessed:
    - sentencepiece-style BPE with byte fallback and the "▁" space marker (Llama 2, Mistral, phi-3):
      ("llama", "default"), llama.cpp's SPM tokenizer;
    - GPT-2-style byte-level BPE: ("gpt2", "gpt-2") when the pre-tokenizer is ByteLevel's regex alone,
      ("gpt2", "smollm") when digits are first split one by one (SmolLM, SmolLM2): the regexes llama.cpp
      runs under those names are these pre-tokenizers'.
    """
    model, pre, norm = tj.get("model") or {}, tj.get("pre_tokenizer"), tj.get("normalizer")
    parts = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre] if pre else [])
    types = [p.get("type") for p in parts]
    if model.get("type") == "BPE" and model.get("byte_fallback") and "ByteLevel" not in types:
        return "llama", "default"
    if model.get("type") == "BPE" and types and types[-1] == "ByteLevel" and norm is None:
        bl = parts[-1]
        if bl.get("use_regex", True) and not bl.get("add_prefix_space", False):
            if types == ["ByteLevel"]:
                return "gpt2", "gpt-2"
            if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
                return "gpt2", "smollm"
    raise GGUFError(f"{model_dir / 'tokenizer.json'}: a {model.get('type')} tokenizer with pre-tokenizer {types or None} and "
                    f"normalizer {(norm or {}).get('type')} is not one the GGUF export writes (sentencepiece-style BPE with "
                    "byte fallback; GPT-2 byte-level BPE, plain or with single digits as SmolLM's). Export safetensors "
                    "(the default format) and convert it with llama.cpp's convert_hf_to_gguf.py")


def _space_prefix(tj: dict) -> bool:
    """tokenizer.ggml.add_space_prefix of a sentencepiece-style tokenizer: does "▁" go before text?

    llama.cpp puts it before the text after every special token, or nowhere. transformers (5.x) rebuilds
    a Llama/phi-3 tokenizer with Metaspace(prepend_scheme="first"): the marker before the very first
    word of the input only, and not when the text already starts with a space. GGUF cannot say
    "first"; this writes False for it, so that every text that follows a special token, which is every
    message of a chat prompt, tokenises as in transformers; what differs is a text that starts with a
    word and no special token before it (llama.cpp then gives that first word without its marker)."""
    pre = tj.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") == "always" and p.get("add_prefix_space", True)
    return False


def _vocab(model_dir: Path, n_vocab: int) -> dict:
    """The tokenizer as llama.cpp's converter writes it: {model, pre, tokens, types, scores or None, space_prefix}."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{model_dir}: no tokenizer.json; the GGUF export embeds the tokenizer from it")
    tj = json.loads(path.read_text(encoding="utf-8"))
    kind, pre = _pre_tokenizer_kind(model_dir, tj)
    vocab: dict[str, int] = tj["model"]["vocab"]
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    if size > n_vocab:
        raise GGUFError(f"{model_dir}: the tokenizer has {size} tokens but the embeddings only {n_vocab} rows")
    tokens: list[str | None] = [None] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
    types = [gguf.TokenType.NORMAL] * n_vocab
    unk = tj["model"].get("unk_token")
    for i, text in enumerate(tokens):
        if text is None:
            continue
        if kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = gguf.TokenType.BYTE
        elif text == unk:
            types[i] = gguf.TokenType.UNKNOWN
    for i, a in added.items():  # the converter's rule: special added tokens are control tokens, others user-defined
        tokens[i] = a["content"]
        types[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i, text in enumerate(tokens):  # rows the model has beyond the tokenizer (padded vocabularies)
        if text is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    scores = None
    if kind == "llama":
        # llama.cpp's SPM tokenizer joins adjacent pieces by the score of what they make, highest first;
        # transformers' BPE applies merges by rank, lowest first. So the score of a token is minus the
        # rank of the merge that makes it (what sentencepiece's own scores order by). The id is not the
        # rank: phi-3's runs of 2-16 spaces have ids 259-273 and come last among 61,249 merges.
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(_merge_pairs(tj["model"].get("merges", []))):
            rank.setdefault(a + b, r)
        last = len(rank)
        scores = [0.0] * n_vocab
        for i, text in enumerate(tokens):
            if types[i] == gguf.TokenType.NORMAL:
                # a piece no merge makes is never made by transformers; rank it below every merge
                scores[i] = -float(rank.get(text, last + i))
            elif types[i] in (gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL):
                scores[i] = -1000.0  # the converter's score for added tokens
            elif types[i] == gguf.TokenType.UNUSED:
                scores[i] = -10000.0
    return {"model": kind, "pre": pre, "tokens": [t.encode("utf-8") for t in tokens], "types": types, "scores": scores,
            "space_prefix": _space_prefix(tj) if kind == "llama" else False}


def _tensor_plan(model_dir: Path, config: dict, quant: str):
    """[(gguf name, hf name, gguf type)] in the order they are written."""
    import gguf

    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tensors = model_tensors(model_dir)
    out = []
    for hf in tensors:
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{model_dir}: tensor {hf} has no GGUF name in the llama architecture; not a plain Llama/Mistral")
        shape = tensors[hf].shape
        if len(shape) == 1:
            kind = gguf.GGMLQuantizationType.F32
        elif name == "output.weight":
            # The LM head stays float16 in a q8_0 file (llama-quantize's --leave-output-tensor): measured on
            # the pico model, top-1 agreement with the float32 model 99.7% against 99.0% with a q8_0 head,
            # for 1% more file on a 7B.
            kind = gguf.GGMLQuantizationType.F16
        elif quant == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
        else:
            kind = gguf.GGMLQuantizationType.F16
        out.append((name, hf, kind))
    if not any(g == "output.weight" for g, _, _ in out):
        # Tied embeddings: write the LM head too, so that every reader (llama.cpp, transformers) gets it.
        emb = next(hf for g, hf, _ in out if g == "token_embd.weight")
        out.append(("output.weight", emb, gguf.GGMLQuantizationType.F16))
    return out


def _array(info, gguf_name: str, config: dict) -> np.ndarray:
    w = read_tensor(info).float().numpy()
    if gguf_name.endswith("attn_q.weight"):
        w = _permute(w, config["num_attention_heads"])
    elif gguf_name.endswith("attn_k.weight"):
        w = _permute(w, config.get("num_key_value_heads") or config["num_attention_heads"])
    return w


def write_gguf(model_dir: Path, path: Path, quant: str, name: str) -> None:
    """M_t's folder (safetensors + config + tokenizer) as one GGUF file, one tensor in memory at a time."""
    import gguf

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    check_architecture(config, model_dir)
    heads = config["num_attention_heads"]
    plan = _tensor_plan(model_dir, config, quant)
    n_vocab = config["vocab_size"]
    vocab = _vocab(model_dir, n_vocab)

    w = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
    # The size as the converter labels it ("135M", "7B"): the model's own parameters, a tied head once.
    n_params = sum(int(np.prod(info.shape)) for hf, info in model_tensors(model_dir).items() if not hf.endswith("inv_freq"))
    w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    w.add_rope_dimension_count(config["hidden_size"] // heads)
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    w.add_add_space_prefix(vocab["space_prefix"])
    # The merges too: llama.cpp's byte-level BPE applies them by rank, and transformers' GGUF reader
    # rebuilds either kind of tokenizer from them exactly (without them it guesses).
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if "bos" not in special.add_special_token or "eos" not in special.add_special_token:
        # tokenizer.json's post-processor says whether a bos/eos token is added; written either way so
        # that llama.cpp does not fall back to its default for the tokenizer kind.
        post = (json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("post_processor") or {})
        single = [p for q in post.get("processors", [post]) if q.get("type") == "TemplateProcessing" for p in q.get("single", [])]
        special.add_special_token.setdefault("bos", bool(single) and "SpecialToken" in single[0])
        special.add_special_token.setdefault("eos", bool(single) and "SpecialToken" in single[-1])
    special.add_to_gguf(w, quiet=True)
    if not special.chat_template:
        tc = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").is_file() else {}
        if tc.get("chat_template"):
            w.add_chat_template(tc["chat_template"])

    infos = model_tensors(model_dir)
    for gname, hf, kind in plan:
        shape = tuple(infos[hf].shape)
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor_info(gname, shape, np.dtype(np.float16), 2 * int(np.prod(shape)))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, hf, kind in plan:
        a = _array(infos[hf], gname, config)
        if kind == gguf.GGMLQuantizationType.F32:
            a = a.astype(np.float32)
        elif kind == gguf.GGMLQuantizationType.F16:
            a = a.astype(np.float16)
        else:
            a = gguf.quants.quantize(a, kind)
        w.write_tensor_data(a)
        del a
    w.close()


def _eos_tokens(model_dir: Path) -> list[str]:
    """The texts of the end-of-turn tokens (generation_config's eos ids), for Ollama's stop parameters."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        p = model_dir / name
        if p.is_file():
            e = json.loads(p.read_text()).get("eos_token_id")
            ids += e if isinstance(e, list) else [e] if e is not None else []
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    by_id = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    return list(dict.fromkeys(by_id[i] for i in ids if i in by_id))


def modelfile(file_name: str, stops: list[str]) -> str:
    lines = [
        "# Ollama: ollama create NAME -f Modelfile && ollama run NAME",
        "# The prompt template is the chat template embedded in the GGUF file (tokenizer.chat_template).",
        f"FROM ./{file_name}",
        "PARAMETER temperature 0",
    ]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def export_gguf(run_dir: Path, output: Path, step: int | None = None, quant: str = "f16") -> dict:
    """Write EXPORT/ (see the module docstring) atomically; returns the marker's contents."""
    if quant not in QUANTS:
        raise GGUFError(f"--quant {quant!r}: choose f16 or q8_0")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError("the GGUF export needs the gguf library; install it with: pip install 'lora-sdpo[gguf]'") from None
    run, m, recipe_text = read_run(run_dir)
    step = pick_step(run, m, step)
    model_dir = run.model_dir(step)
    if not model_dir.is_dir():
        raise GGUFError(f"{model_dir}: M_{step} was pruned (run.keep_models = \"last\"); export the last step, or rebuild "
                        f"M_{step} from S with `lora-sdpo merge` and the adapters of steps 1..{step}")
    check_architecture(json.loads((model_dir / "config.json").read_text()), model_dir)  # before anything is written
    output = Path(output).resolve()
    check_output(output, {"run": run.root}, replaceable=(MARKER,))
    file_name = f"model-{quant}.gguf"
    name = f"{base_identity(run.root, m)[1]} sDPO M_{step}"
    with atomic_dir(output) as tmp:
        write_gguf(model_dir, tmp / file_name, quant, name)
        (tmp / "Modelfile").write_text(modelfile(file_name, _eos_tokens(model_dir)))
        (tmp / "README.md").write_text(gguf_card(run.root, m, recipe_text, step, quant, file_name, base_license(model_dir)))
        (tmp / "recipe.toml").write_text(recipe_text)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        marker = {"format": 1, "tool": f"lora-sdpo {__version__}", "what": "gguf", "step": step, "dtype": quant,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker
