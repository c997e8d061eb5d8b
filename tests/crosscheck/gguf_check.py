"""Check a GGUF file tinygpt wrote against gguf-py (the format's Python reference) and, when
llama-cpp-python is installed, against llama.cpp itself.

    python gguf_check.py MODEL.gguf MODEL_DIR DTYPE [LOGITS.json]

MODEL_DIR is the f32 model directory the file was exported from (model.safetensors,
config.json, tokenizer.json). The expected tensors are rebuilt here from it, independently of
the Rust export: names, ggml shapes and types, gpt2's transposed Conv1D weights, llama's
q/k rows permuted to adjacent rotary pairs. Float tensors must be equal (f16: equal to
numpy's cast); Q8_0 and Q4_0 bytes must equal gguf.quants.quantize of the expected tensor, byte
for byte. Offsets must be contiguous and aligned as llama.cpp checks, the keys of the right
types, the tokenizer's tokens those of tokenizer.json.

LOGITS.json ({"ids": [...], "logits": [[...], ...]}) holds tinygpt's logits for a token
sequence; with llama_cpp importable they are compared with llama.cpp's (f32, f16: 1e-3
relative to the logits' scale; q8_0, q4_0: mean NLL within 2%). Prints one line per result;
exits 1 on the first mismatch.
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file


def fail(msg):
    print(f"MISMATCH: {msg}")
    sys.exit(1)


def permute(w, heads):
    """Rotate-half rows to adjacent pairs, as llama.cpp's converter does."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def expected_tensors(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    st = load_file(str(model_dir / "model.safetensors"))
    out = {}
    if cfg["model_type"] == "gpt2":
        c = cfg["n_embd"]
        zeros = lambda n: np.zeros(n, dtype=np.float32)
        bias = lambda name, n: st.get(name, zeros(n))
        out["token_embd.weight"] = st["transformer.wte.weight"]
        out["position_embd.weight"] = st["transformer.wpe.weight"]
        for l in range(cfg["n_layer"]):
            h = f"transformer.h.{l}."
            f = st[h + "mlp.c_fc.weight"].shape[1]
            out[f"blk.{l}.attn_norm.weight"] = st[h + "ln_1.weight"]
            out[f"blk.{l}.attn_norm.bias"] = bias(h + "ln_1.bias", c)
            out[f"blk.{l}.attn_qkv.weight"] = st[h + "attn.c_attn.weight"].T
            out[f"blk.{l}.attn_qkv.bias"] = bias(h + "attn.c_attn.bias", 3 * c)
            out[f"blk.{l}.attn_output.weight"] = st[h + "attn.c_proj.weight"].T
            out[f"blk.{l}.attn_output.bias"] = bias(h + "attn.c_proj.bias", c)
            out[f"blk.{l}.ffn_norm.weight"] = st[h + "ln_2.weight"]
            out[f"blk.{l}.ffn_norm.bias"] = bias(h + "ln_2.bias", c)
            out[f"blk.{l}.ffn_up.weight"] = st[h + "mlp.c_fc.weight"].T
            out[f"blk.{l}.ffn_up.bias"] = bias(h + "mlp.c_fc.bias", f)
            out[f"blk.{l}.ffn_down.weight"] = st[h + "mlp.c_proj.weight"].T
            out[f"blk.{l}.ffn_down.bias"] = bias(h + "mlp.c_proj.bias", c)
        out["output_norm.weight"] = st["transformer.ln_f.weight"]
        out["output_norm.bias"] = bias("transformer.ln_f.bias", c)
    else:
        out["token_embd.weight"] = st["model.embed_tokens.weight"]
        for l in range(cfg["num_hidden_layers"]):
            h = f"model.layers.{l}."
            out[f"blk.{l}.attn_norm.weight"] = st[h + "input_layernorm.weight"]
            out[f"blk.{l}.attn_q.weight"] = permute(st[h + "self_attn.q_proj.weight"], cfg["num_attention_heads"])
            out[f"blk.{l}.attn_k.weight"] = permute(st[h + "self_attn.k_proj.weight"], cfg["num_key_value_heads"])
            out[f"blk.{l}.attn_v.weight"] = st[h + "self_attn.v_proj.weight"]
            out[f"blk.{l}.attn_output.weight"] = st[h + "self_attn.o_proj.weight"]
            out[f"blk.{l}.ffn_norm.weight"] = st[h + "post_attention_layernorm.weight"]
            out[f"blk.{l}.ffn_gate.weight"] = st[h + "mlp.gate_proj.weight"]
            out[f"blk.{l}.ffn_up.weight"] = st[h + "mlp.up_proj.weight"]
            out[f"blk.{l}.ffn_down.weight"] = st[h + "mlp.down_proj.weight"]
        out["output_norm.weight"] = st["model.norm.weight"]
        if not cfg.get("tie_word_embeddings", False):
            out["output.weight"] = st["lm_head.weight"]
    return cfg, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def expected_type(dtype, name, shape, tied):
    if len(shape) == 1 or dtype == "f32":
        return T.F32
    if dtype == "f16":
        return T.F16
    if name == "position_embd.weight":
        return T.F32
    if shape[-1] % 32:
        return T.F16
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    return T.Q4_0 if dtype == "q4_0" and not output else T.Q8_0


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        fail(f"no key {key}")
    return f


def scalar(reader, key, vtype):
    f = field(reader, key)
    if f.types != [vtype]:
        fail(f"{key} has types {f.types}, expected {vtype}")
    return f.contents()


def main():
    path, model_dir, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    reader = GGUFReader(str(path))
    cfg, want = expected_tensors(model_dir)
    arch = cfg["model_type"]
    if scalar(reader, "GGUF.version", GGUFValueType.UINT32) != 3:
        fail("not GGUF version 3")
    if scalar(reader, "general.architecture", GGUFValueType.STRING) != arch:
        fail("architecture")
    align = scalar(reader, "general.alignment", GGUFValueType.UINT32)
    u32 = ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count"]
    for key in u32:
        scalar(reader, f"{arch}.{key}", GGUFValueType.UINT32)
    eps = "attention.layer_norm_epsilon" if arch == "gpt2" else "attention.layer_norm_rms_epsilon"
    scalar(reader, f"{arch}.{eps}", GGUFValueType.FLOAT32)
    ctx = cfg.get("n_positions") or cfg["max_position_embeddings"]
    if scalar(reader, f"{arch}.context_length", GGUFValueType.UINT32) != ctx:
        fail("context_length")

    # Tensors: the set the arch uses, each at its contiguous offset, with its values.
    names = [t.name for t in reader.tensors]
    if sorted(names) != sorted(want):
        fail(f"tensors {sorted(set(names) ^ set(want))} differ")
    tied = arch == "gpt2" or cfg.get("tie_word_embeddings", False)
    start = reader.tensors[0].data_offset
    if start % align:
        fail("data section not aligned")
    offset = start
    for t in reader.tensors:
        if t.data_offset != offset:
            fail(f"{t.name} at offset {t.data_offset}, expected {offset}")
        offset += -(-t.n_bytes // align) * align
        w = want[t.name]
        if list(t.shape) != list(reversed(w.shape)):
            fail(f"{t.name}: ggml shape {list(t.shape)}, expected {list(reversed(w.shape))}")
        ty = expected_type(dtype, t.name, w.shape, tied)
        if t.tensor_type != ty:
            fail(f"{t.name}: type {t.tensor_type.name}, expected {ty.name}")
        got = dequantize(t.data, t.tensor_type).reshape(w.shape)
        if ty == T.F32:
            same = np.array_equal(got, w)
        elif ty == T.F16:
            same = np.array_equal(got, w.astype(np.float16).astype(np.float32))
        else:
            same = np.array_equal(np.asarray(t.data).tobytes(), quantize(w, ty).tobytes())
        if not same:
            fail(f"{t.name} ({ty.name}) differs from the reference")

    # Tokenizer: tokens as tokenizer.json gives them (byte-level), types, merges, special ids.
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = field(reader, "tokenizer.ggml.tokens").contents()
    if len(tokens) != want["token_embd.weight"].shape[0] or len(set(tokens)) != len(tokens):
        fail("token list: one distinct token per embedding row")
    if field(reader, "tokenizer.ggml.token_type").types != [GGUFValueType.ARRAY, GGUFValueType.INT32]:
        fail("token_type is not an array of INT32")
    byte_level = "ByteLevel" in json.dumps(tok.get("pre_tokenizer"))
    vocab = dict(tok["model"]["vocab"])
    vocab.update({a["content"]: a["id"] for a in tok["added_tokens"]})
    for text, i in vocab.items():
        if byte_level and tokens[i] != text:
            fail(f"token {i} is {tokens[i]!r}, tokenizer.json has {text!r}")
    if byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
        if field(reader, "tokenizer.ggml.merges").contents() != merges:
            fail("merges differ from tokenizer.json")
    eot = cfg["eos_token_id"]
    for key in ["bos_token_id", "eos_token_id", "eot_token_id"]:
        if scalar(reader, f"tokenizer.ggml.{key}", GGUFValueType.UINT32) != eot:
            fail(key)
    if scalar(reader, "tokenizer.ggml.pre", GGUFValueType.STRING) != "gpt-2":
        fail("pre-tokenizer")
    print(f"gguf-py: {len(names)} tensors of {path.name} ({dtype}) match")

    if len(sys.argv) > 4:
        run_llama_cpp(path, model_dir, dtype, json.loads(Path(sys.argv[4]).read_text()))


def nll(logits, ids):
    logits = np.asarray(logits, dtype=np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]))


def run_llama_cpp(path, model_dir, dtype, ours):
    try:
        from llama_cpp import Llama
    except ImportError:
        print("SKIPPED: llama.cpp comparison (no llama_cpp module; see the README to build llama-cpp-python)")
        return
    ids = ours["ids"]
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=max(len(ids), 64), verbose=False, n_threads=2)
    # The tokenizer: llama.cpp splits text into the ids Hugging Face's tokenizer gives.
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = hf.decode(ids) + " Once upon a time,  there was a girl.\n"
    want = hf.encode(text).ids[:60]
    got = llm.tokenize(hf.decode(want).encode(), add_bos=False, special=False)
    if got != hf.encode(hf.decode(want)).ids:
        fail(f"llama.cpp tokenizes {hf.decode(want)!r} as {got}, Hugging Face as {hf.encode(hf.decode(want)).ids}")
    print(f"llama.cpp: tokenizes {len(got)} tokens of text as tokenizer.json does")
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    mine = np.array(ours["logits"], dtype=np.float64)
    if dtype in ("f32", "f16"):
        scale = np.abs(mine).max()
        err = np.abs(theirs - mine).max() / scale
        if err > 1e-3 * (10 if dtype == "f16" else 1):
            fail(f"llama.cpp logits differ by {err:.2e} of their scale")
        print(f"llama.cpp: logits within {err:.1e} of ours")
    else:
        a, b = nll(mine, ids), nll(theirs, ids)
        if abs(a - b) / a > 0.02:
            fail(f"llama.cpp mean NLL {b:.4f} vs ours {a:.4f}")
        print(f"llama.cpp: mean NLL {b:.4f} vs ours {a:.4f}")


if __name__ == "__main__":
    main()
