"""llama.cpp itself (libllama, b4965) reading a GGUF file, against transformers reading the model folder.

    python scripts/gguf_llama_cpp.py GGUF MODEL_DIR        # prints ids, top-1 agreement, max |logit diff|, greedy

libllama comes from the prebuilt `llama-cpp-cffi==0.4.42` wheel (llama.cpp b4965), installed apart by
scripts/install_llama_cpp.sh into .llama-cpp/ (LORA_SDPO_LLAMA_CPP names another folder). Only its
CPU extension module is used, opened with lazy symbol binding: the library references
`__cxa_call_terminate`, which older libstdc++ (Debian 12's) lacks and which llama.cpp reaches only when
it is already crashing. Its cffi `lib` and `ffi` carry llama.h's own declarations, so nothing here
re-declares llama.cpp's structures; every function called is libllama's: model load, tokenize, the
embedded chat template and llama_chat_apply_template, decode, logits.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VERSION = "b4965"  # what llama-cpp-cffi 0.4.42 builds (scripts/install_llama_cpp.sh)


def library_dir() -> Path:
    return Path(os.environ.get("LORA_SDPO_LLAMA_CPP") or ROOT / ".llama-cpp")


_LIB = None
LOG: list[str] = []


def _load():
    """(lib, ffi) of libllama, loaded once per process; ImportError saying what to run when absent."""
    global _LIB
    if _LIB is None:
        folder = library_dir()
        found = sorted((folder / "llama").glob("_llama_cpp_cpu.*.so"))
        if not found:
            raise ImportError(f"no libllama under {folder}: run scripts/install_llama_cpp.sh "
                              "(or set LORA_SDPO_LLAMA_CPP to the folder it installed into)")
        if str(folder) not in sys.path:
            sys.path.append(str(folder))  # for cffi's _cffi_backend when the environment has none
        spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", found[0])
        flags = sys.getdlopenflags()
        sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
        try:
            module = importlib.util.module_from_spec(spec)  # the dlopen
            spec.loader.exec_module(module)
        finally:
            sys.setdlopenflags(flags)
        lib, ffi = module.lib, module.ffi
        def keep(level, text, data):  # quiet; the last lines are kept for error messages
            LOG.append(ffi.string(text).decode(errors="replace"))
            del LOG[:-40]

        log = ffi.callback("void(enum ggml_log_level, char *, void *)", keep)
        lib.llama_log_set(log, ffi.NULL)  # kept alive in _LIB
        lib.llama_backend_init()
        _LIB = (lib, ffi, log)
    return _LIB[0], _LIB[1]


class LlamaCpp:
    """One GGUF file loaded by libllama on the CPU, with a context of n_ctx tokens."""

    def __init__(self, gguf: Path, n_ctx: int = 512, threads: int = 1):
        lib, ffi = self.lib, self.ffi = _load()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mp)
        if self.model == ffi.NULL:
            raise RuntimeError(f"{gguf}: llama.cpp {VERSION} did not load it:\n{''.join(LOG[-8:])}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if self.ctx == ffi.NULL:
            raise RuntimeError(f"{gguf}: llama.cpp {VERSION} made no context for it")
        self.n_ctx = n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def close(self):
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def meta(self, key: str) -> str | None:
        buf = self.ffi.new("char[]", 1 << 16)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else self.ffi.string(buf).decode()

    def desc(self) -> str:
        buf = self.ffi.new("char[]", 256)
        self.lib.llama_model_desc(self.model, buf, len(buf))
        return self.ffi.string(buf).decode()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = text.encode()
        cap = len(raw) + 16
        out = self.ffi.new("int32_t[]", cap)
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), out, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(out[0:n])

    def piece(self, token: int) -> bytes:
        buf = self.ffi.new("char[]", 256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return self.ffi.buffer(buf, max(n, 0))[:]

    def chat_template(self) -> str | None:
        t = self.lib.llama_model_chat_template(self.model, self.ffi.NULL)
        return None if t == self.ffi.NULL else self.ffi.string(t).decode()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """llama_chat_apply_template with the model's embedded template (llama.cpp's own rendering)."""
        ffi = self.ffi
        keep = [(ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())) for m in messages]
        msgs = ffi.new("struct llama_chat_message[]", len(keep))
        for i, (role, content) in enumerate(keep):
            msgs[i].role, msgs[i].content = role, content
        tmpl = self.lib.llama_model_chat_template(self.model, ffi.NULL)
        if tmpl == ffi.NULL:
            raise RuntimeError("the GGUF has no chat template")
        cap = 4096 + sum(len(m["content"].encode()) for m in messages) * 2
        buf = ffi.new("char[]", cap)
        n = self.lib.llama_chat_apply_template(tmpl, msgs, len(keep), add_generation_prompt, buf, cap)
        if n < 0:
            raise RuntimeError("llama_chat_apply_template does not know the embedded template")
        return ffi.buffer(buf, n)[:].decode()

    def logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        """[len(ids), n_vocab] float32: the next-token logits at every position of ids, decoded in one batch
        at positions start.. (start = 0 empties the cache first; otherwise the cache holds the tokens before)."""
        lib, ffi = self.lib, self.ffi
        if start + len(ids) > self.n_ctx:
            raise ValueError(f"{start + len(ids)} tokens > n_ctx {self.n_ctx}")
        if start == 0:
            lib.llama_kv_self_clear(self.ctx)
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(ids)
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
            for i in range(len(ids)):
                out[i] = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(self.ctx, i), 4 * self.n_vocab), dtype=np.float32)
            return out
        finally:
            lib.llama_batch_free(batch)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n tokens chosen by argmax, one decode at a time on llama.cpp's KV cache (no stop at end of turn)."""
        out: list[int] = []
        last = self.logits(ids)[-1]
        while len(out) < n:
            out.append(int(last.argmax()))
            if len(out) < n:
                last = self.logits(out[-1:], start=len(ids) + len(out) - 1)[-1]
        return out


# What the comparison runs on: chat prompts rendered by the embedded template, and plain texts with
# runs of spaces, indentation, newlines, digits and non-Latin text.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
     {"role": "user", "content": "Now  with   type hints, please."}],
    [{"role": "user", "content": "Translate 'good morning' into French, German and Japanese (おはよう?)."}],
]
TEXTS = [
    "Hello world",
    " leading space, then  two and   three spaces.",
    "def f(x):\n    if x:\n        return  x * 2\n\treturn 0\n",
    "Line one\n\nLine three\n\n\n  indented after blank lines",
    "Numbers: 3.14159, 2026-12-07, 1234567890 and 007.",
    "Привет, мир! Γειά σου κόσμε. 你好，世界。 こんにちは。 مرحبا",
    "Emoji 🙂 and symbols ©®™ — “quotes” … ½",
    "trailing spaces   \n    ",
    "MixedCASE camelCase snake_case kebab-case URL https://example.com/a?b=1&c=2",
    "           eleven leading spaces",
]


def compare(gguf: Path, model_dir: Path, logits: bool = True, n_new: int = 8) -> dict:
    """llama.cpp on GGUF against transformers on MODEL_DIR (float32), on CHATS and TEXTS.

    Chat prompts are rendered by the embedded template twice: by transformers (Jinja, as llama-server
    --jinja and Ollama render it) and by llama.cpp's llama_chat_apply_template (its built-in formats);
    both renderings are kept, and llama.cpp tokenises transformers' rendering. Plain texts are tokenised
    as they are and with one leading space (see docs/export-and-push.md on the first word's marker).
    With logits: every position of every chat prompt, top-1 and max |logit difference|, and n_new greedy
    tokens after each prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    res = {"chats": [], "texts": []}
    with LlamaCpp(gguf) as llm:
        res.update(desc=llm.desc(), size_label=llm.meta("general.size_label"), name=llm.meta("general.name"),
                   template=llm.chat_template())
        for msgs in CHATS:
            theirs = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            res["chats"].append({"rendered": theirs, "llama_rendered": llm.apply_chat_template(msgs),
                                 "llama": llm.tokenize(theirs, add_special=False),
                                 "hf": tok(theirs, add_special_tokens=False).input_ids})
        for text in TEXTS:
            res["texts"].append({"text": text, "llama": llm.tokenize(text), "llama_space": llm.tokenize(" " + text),
                                 "hf": tok(text).input_ids})
        if not logits:
            return res
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        res.update(max_logit_diff=0.0, max_abs_logit=0.0, top1_equal=0, positions=0, greedy=[])
        for c in res["chats"]:
            ids = c["hf"]
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0].numpy()
            got = llm.logits(ids)[:, : want.shape[1]]
            res["max_logit_diff"] = max(res["max_logit_diff"], float(np.abs(got - want).max()))
            res["max_abs_logit"] = max(res["max_abs_logit"], float(np.abs(want).max()))
            res["top1_equal"] += int((got.argmax(-1) == want.argmax(-1)).sum())
            res["positions"] += len(ids)
            hf_new, past, step = [], None, ids
            while len(hf_new) < n_new:  # argmax on transformers' KV cache, as LlamaCpp.greedy does on llama.cpp's
                with torch.no_grad():
                    o = model(torch.tensor([step]), cache=past, use_cache=True)
                hf_new.append(int(o.logits[0, -1].argmax()))
                past, step = o.cache, hf_new[-1:]
            res["greedy"].append({"hf": hf_new, "llama": llm.greedy(ids, n_new)})
    return res


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2].strip())
        return 2
    gguf, model_dir = Path(argv[0]), Path(argv[1])
    r = compare(gguf, model_dir)
    print(f"llama.cpp {VERSION}: {r['desc']}  general.name={r['name']!r}  general.size_label={r['size_label']!r}")
    same = sum(c["llama"] == c["hf"] for c in r["chats"])
    print(f"chat prompts (rendered by the embedded template): token ids equal {same}/{len(r['chats'])}; "
          f"llama_chat_apply_template renders the same text for {sum(c['rendered'] == c['llama_rendered'] for c in r['chats'])}")
    for c in r["chats"]:
        if c["llama"] != c["hf"]:
            print(f"  llama.cpp {c['llama']}\n  transformers {c['hf']}")
    print(f"plain texts: token ids equal {sum(t['llama'] == t['hf'] for t in r['texts'])}/{len(r['texts'])}, "
          f"with a leading space for llama.cpp {sum(t['llama_space'] == t['hf'] for t in r['texts'])}/{len(r['texts'])}")
    for t in r["texts"]:
        if t["llama"] != t["hf"] and t["llama_space"] != t["hf"]:
            print(f"  {t['text']!r}\n  llama.cpp {t['llama']}\n  transformers {t['hf']}")
    print(f"top-1 equal at {r['top1_equal']}/{r['positions']} positions; max |logit difference| "
          f"{r['max_logit_diff']:.3g} (largest |logit| {r['max_abs_logit']:.3g})")
    print(f"greedy continuations ({len(r['greedy'][0]['hf'])} tokens) equal: "
          f"{sum(g['hf'] == g['llama'] for g in r['greedy'])}/{len(r['greedy'])}")
    for g in r["greedy"]:
        if g["hf"] != g["llama"]:
            print(f"  llama.cpp {g['llama']}\n  transformers {g['hf']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
