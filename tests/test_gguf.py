"""`align export --format gguf`: llama.cpp's tensor names, layout and metadata, read back with gguf's own reader.

The llama.cpp run itself (same tokens, same greedy text, q8_0 perplexity) is benchmarks/gguf_llamacpp.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests._post_utils import one_thread  # noqa: F401  (autouse: one intra-op thread)

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install -e '.[gguf]'): GGUF tests did not run")

from pretrain.export import ExportConfig, cli, gguf_chat_template, main, rope_interleave, save_gguf  # noqa: E402
from pretrain.model import Llama, apply_rope, rope_cache, shape_from_preset  # noqa: E402

CONTROL, NORMAL, UNUSED = 3, 1, 5  # llama.cpp's token types (gguf.TokenType)
# the 'test' preset: hidden 64, MLP 176, 2 layers, 4 query heads, 2 key/value heads, context 256
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def expected_names() -> dict[str, str]:
    """HF name -> llama.cpp name for the 'test' preset with tied embeddings (no output.weight)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(2):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{gg}" for hf, gg in BLOCK_NAMES.items()})
    return names


def undo_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of the documented row order, by index: HF row r * hs/2 + i of a head is GGUF row 2i + r."""
    hs = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(hs // 2):
            for r in range(2):
                out[h * hs + r * hs // 2 + i] = w[h * hs + 2 * i + r]
    return out


def field(reader, key):
    """A metadata value from a GGUFReader: scalars as Python values, arrays as lists, strings decoded."""
    f = reader.fields[key]
    return f.contents()


@pytest.fixture(scope="module")
def source(tiny_model_dir):
    from safetensors.torch import load_file

    return load_file(str(tiny_model_dir / "model.safetensors"))


def export(model_dir, out, gguf_type):
    path = main(ExportConfig(model_dir=str(model_dir), format="gguf", gguf_type=gguf_type, output_dir=str(out)))
    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def f16(tiny_model_dir, tmp_path_factory):
    return export(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "f16", "f16")


@pytest.fixture(scope="module")
def q8(tiny_model_dir, tmp_path_factory):
    return export(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "q8", "q8_0")


def test_names_match_gguf_llama_architecture():
    """Our hand-written names are the ones llama.cpp's own tables give for the Llama architecture."""
    llama = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in llama for i in range(2)}
    assert set(expected_names().values()) <= allowed
    assert "output.weight" in allowed


def test_f16_tensors_equal_source(f16, source):
    tensors = {t.name: t for t in f16.tensors}
    assert set(tensors) == set(expected_names().values())  # tied head: llama.cpp reuses token_embd, no output.weight
    for hf, gg in expected_names().items():
        t, want = tensors[gg], source[hf].numpy()
        assert list(t.shape) == list(reversed(want.shape)), gg  # ggml order: fastest-varying dimension first
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, gg
            np.testing.assert_array_equal(t.data, want)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.F16, gg
        got = np.asarray(t.data).reshape(want.shape).astype(np.float32)
        if hf.endswith("q_proj.weight"):
            got = undo_interleave(got, 4)
        elif hf.endswith("k_proj.weight"):
            got = undo_interleave(got, 2)
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=gg)
    # the permutation did move rows: without undoing it, q differs
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).astype(np.float32)
    q_hf = source["model.layers.0.self_attn.q_proj.weight"].numpy().astype(np.float16).astype(np.float32)
    assert not np.array_equal(q, q_hf)


def test_metadata(f16, tiny_model_dir, tiny_tokenizer):
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    want = {
        "general.architecture": "llama", "general.file_type": 1,
        "llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 176,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.vocab_size": len(tiny_tokenizer),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.padding_token_id": 1,
        "tokenizer.ggml.eot_token_id": 3, "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in want.items():
        assert field(f16, key) == value, key
    assert math.isclose(field(f16, "llama.rope.freq_base"), hf["rope_theta"] if "rope_theta" in hf else 10000.0)
    assert math.isclose(field(f16, "llama.attention.layer_norm_rms_epsilon"), 1e-5, rel_tol=1e-6)

    tokens = field(f16, "tokenizer.ggml.tokens")
    assert tokens == tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
    assert tokens[:4] == ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    # byte-level strings, as llama.cpp's gpt2 model reads them
    assert tokens[tiny_tokenizer.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    types = field(f16, "tokenizer.ggml.token_type")
    assert types == [CONTROL] * 20 + [NORMAL] * (len(tiny_tokenizer) - 20)  # 4 special + 16 reserved, then BPE tokens
    tok_json = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    assert field(f16, "tokenizer.ggml.merges") == [" ".join(m) for m in tok_json["model"]["merges"]]

    template = field(f16, "tokenizer.chat_template")
    assert "{% generation %}" not in template and "{% if true %}" in template and "<|im_start|>" in template
    import jinja2

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 12?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    env = jinja2.Environment()
    for gen in (False, True):
        ours = env.from_string(template).render(messages=msgs, add_generation_prompt=gen)
        assert ours == tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_q8_0_within_its_error_bound(q8, source):
    tensors = {t.name: t for t in q8.tensors}
    assert field(q8, "general.file_type") == 7
    for hf, gg in expected_names().items():
        t, want = tensors[gg], source[hf].numpy()
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        if want.shape[1] % 32:  # ffn_down: rows of 176 values are not whole 32-value blocks, so it stays f16
            assert gg.endswith("ffn_down.weight") and t.tensor_type == gguf.GGMLQuantizationType.F16
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, gg
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        if hf.endswith("q_proj.weight"):
            got = undo_interleave(got, 4)
        elif hf.endswith("k_proj.weight"):
            got = undo_interleave(got, 2)
        # per 32-value block: scale d = max|x| / 127 stored as f16 (relative error <= 2^-11), q = round(x / d),
        # |q| <= 127, so |x - q * d16| <= d / 2 + 127 * d * 2^-11
        blocks, gblocks = want.reshape(-1, 32), got.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(blocks - gblocks)
        assert (err <= d * (0.5 + 127 * 2.0**-11) + 1e-12).all(), gg
        assert err.max() > 0  # really quantized, not a copy


def test_rope_interleave_is_llama_cpp_rotation():
    """Interleaved rotary embedding (llama.cpp's Llama: pairs 2i, 2i+1) on the reordered weights gives, per head, the
    same q.k scores as HF's half-split rotary embedding on the original weights."""
    torch.manual_seed(0)
    shape = shape_from_preset("test", 64)
    nh, hs, T = shape.num_attention_heads, shape.head_dim, 7
    x = torch.randn(T, shape.hidden_size)
    wq = torch.randn(nh * hs, shape.hidden_size)
    cos, sin = rope_cache(shape, T, "cpu")  # (T, hs)
    q_hf = apply_rope(torch.einsum("tc,rc->tr", x, wq).view(T, nh, hs).transpose(0, 1), cos, sin)  # (nh, T, hs)

    q = torch.einsum("tc,rc->tr", x, rope_interleave(wq, nh)).view(T, nh, hs).transpose(0, 1)  # (nh, T, hs)
    theta = shape.rope_theta ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * theta  # (T, hs/2)
    a, b = q[..., 0::2], q[..., 1::2]
    rotated = (a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos())  # each (nh, T, hs/2)
    q_ll = torch.stack(rotated, dim=-1).flatten(-2)  # (nh, T, hs): pairs back in interleaved order

    scores_hf = q_hf @ q_hf.transpose(-1, -2)
    scores_ll = q_ll @ q_ll.transpose(-1, -2)
    torch.testing.assert_close(scores_ll, scores_hf, rtol=1e-4, atol=1e-3)
    # and the rotated vectors are the same numbers in the interleaved order
    torch.testing.assert_close(q_ll[..., 0::2], q_hf[..., : hs // 2], rtol=1e-5, atol=1e-5)


def test_unused_embedding_rows_are_padded(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Llama(shape_from_preset("test", len(tiny_tokenizer) + 3))
    path = tmp_path / "m.gguf"
    save_gguf(model, tiny_tokenizer, path, "f32")
    r = gguf.GGUFReader(path)
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    n = len(tiny_tokenizer)
    assert len(tokens) == n + 3 and tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert types[n:] == [UNUSED] * 3
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert emb.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(emb.data), model.model.embed_tokens.weight.detach().numpy())


def test_untied_head_is_written(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Llama(shape_from_preset("test", len(tiny_tokenizer), tie_word_embeddings=False))
    path = tmp_path / "m.gguf"
    save_gguf(model, tiny_tokenizer, path, "f16")
    out = next(t for t in gguf.GGUFReader(path).tensors if t.name == "output.weight")
    np.testing.assert_array_equal(np.asarray(out.data), model.lm_head.weight.detach().numpy().astype(np.float16))


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        cli([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return e.value.code, lines


@pytest.mark.parametrize("case", ["not_llama", "no_tokenizer", "adapter", "bad_type", "hf_with_model_dir",
                                  "pre_tokenizer", "rope_scaling"])
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, tiny_model_dir, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    out = tmp_path / "out"
    args = ["--format", "gguf", "--model_dir", src, "--output_dir", out]
    if case == "not_llama":
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (src / "config.json").write_text(json.dumps(cfg))
        expect = "expected model_type 'llama' and LlamaForCausalLM"
    elif case == "no_tokenizer":
        (src / "tokenizer.json").unlink()
        expect = "no tokenizer.json"
    elif case == "adapter":
        (src / "config.json").unlink()
        (src / "adapter_config.json").write_text("{}")
        expect = "a LoRA adapter"
    elif case == "bad_type":
        args += ["--gguf_type", "q4_k"]
        expect = "gguf_type: 'q4_k'; expected one of f32, f16, q8_0"
    elif case == "rope_scaling":  # Llama 3.1-style scaled rotary embedding, transformers 5 spelling
        cfg = json.loads((src / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
        (src / "config.json").write_text(json.dumps(cfg))
        expect = "rotary scaling 'llama3' is not supported"
    elif case == "hf_with_model_dir":
        args = ["--model_dir", src, "--output_dir", out]
        expect = "model_dir: only with --format gguf"
    else:  # a pre-tokenizer llama.cpp has no match for: whitespace splitting
        tok = json.loads((src / "tokenizer.json").read_text())
        tok["pre_tokenizer"] = {"type": "Whitespace"}
        (src / "tokenizer.json").write_text(json.dumps(tok))
        expect = "has no llama.cpp equivalent"
    code, lines = run_cli(capsys, *args)
    assert code == 2 and len(lines) == 1 and expect in lines[0], lines
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers


def test_chat_template_markers_keep_whitespace_control():
    import jinja2

    t = "{{ a }} {%- generation %} {{ b }} {% endgeneration -%}\n c{%generation-%} d {%-endgeneration%}"
    plain = gguf_chat_template(t)
    assert "generation" not in plain and plain.count("if true") == 2
    # "-" trims the whitespace on its side: "A" + " B " + "c" + "d" (dropping the tags would give "A  B \n c d ")
    assert jinja2.Environment().from_string(plain).render(a="A", b="B") == "A B cd"


def test_directory_saved_by_transformers(tiny_model_dir, tiny_tokenizer, source, tmp_path):
    """A stage's merged/ output is written by transformers' save_pretrained, not by our save_hf: same tensors."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "merged"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    r = export(src, tmp_path / "out", "f32")
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(expected_names().values())
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data),
                                  source["model.layers.1.mlp.down_proj.weight"].numpy())
    np.testing.assert_array_equal(undo_interleave(np.asarray(tensors["blk.1.attn_k.weight"].data), 2),
                                  source["model.layers.1.self_attn.k_proj.weight"].numpy())
    assert field(r, "general.file_type") == 0 and field(r, "tokenizer.ggml.pre") == "smollm"
