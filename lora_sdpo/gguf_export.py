"""`lora-sdpo export RUN --format gguf`: M_t as one GGUF file for llama.cpp and Ollama.

    EXPORT/
      NAME-QUANT.gguf   M_t (streamed from the run's float32 shards), the tokenizer, its special
                        tokens and the chat template embedded
      Modelfile         for `ollama create`
      README.md         model card: llama.cpp, Ollama, transformers
      recipe.toml       the recipe as run
      export.json       written last: the marker of a finished export, every file and its size

Written with the `gguf` library (gguf-py, llama.cpp's own): its writer, its tensor-name map for the
llama architecture (which llama.cpp also uses for Mistral) and its vocabulary readers
(`LlamaHfVocab` for tokenizer.json, `SpecialVocab` for the special tokens and the chat template).
What convert_hf_to_gguf.py does beyond configuring these for Llama is done here the same way:
q_proj/k_proj rows are permuted to llama.cpp's rotary layout, 1-D tensors stay float32, the
vocabulary is padded to the embedding rows. Other architectures are refused by name.
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


def _vocab(model_dir: Path, n_vocab: int):
    import gguf

    if not (model_dir / "tokenizer.json").is_file():
        raise GGUFError(f"{model_dir}: no tokenizer.json; the GGUF export embeds the tokenizer from it")
    try:
        vocab = gguf.LlamaHfVocab(model_dir)
    except Exception as e:  # gguf-py raises plain exceptions for tokenizers it does not read
        raise GGUFError(f"{model_dir}: the tokenizer is not a Llama-style (sentencepiece BPE) tokenizer.json that GGUF's "
                        f"llama vocabulary can hold ({type(e).__name__}: {e})") from None
    tokens, scores, types = [], [], []
    for i, (text, _, toktype) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        # gguf-py gives every token of a tokenizer.json the same score; llama.cpp's sentencepiece
        # tokenizer merges by score. A sentencepiece-derived vocabulary is in merge order, so the
        # id is the rank: the score sentencepiece itself gives (-id for normal pieces).
        scores.append(-float(i) if toktype == gguf.TokenType.NORMAL else 0.0)
        types.append(toktype)
    if len(tokens) > n_vocab:
        raise GGUFError(f"{model_dir}: the tokenizer has {len(tokens)} tokens but the embeddings only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # rows the model has beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


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
    tokens, scores, types = _vocab(model_dir, n_vocab)

    w = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
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
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # The merges too: transformers' GGUF reader rebuilds the tokenizer from them exactly (without them it guesses).
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
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
