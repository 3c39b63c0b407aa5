"""The from-scratch Llama: logits equal transformers' LlamaForCausalLM loaded from our export."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from pretrain.export import load_hf, save_hf
from pretrain.model import PRESETS, Llama, LlamaShape, shape_from_preset


@pytest.mark.parametrize("nkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_match_transformers(tmp_path, tiny_tokenizer, nkv, tied):
    torch.manual_seed(nkv + 10 * tied)
    shape = LlamaShape(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=nkv, max_position_embeddings=128, tie_word_embeddings=tied)
    ours = Llama(shape).eval()
    save_hf(ours, tiny_tokenizer, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(ref, LlamaForCausalLM)
    assert ref.config.tie_word_embeddings == tied
    idx = torch.randint(0, shape.vocab_size, (3, 37))
    with torch.no_grad():
        a, b = ours(idx), ref(idx).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # left padding: positions count real tokens only, as in HF
    mask = torch.ones_like(idx)
    mask[0, :9] = 0
    with torch.no_grad():
        a, b = ours(idx, attention_mask=mask), ref(idx, attention_mask=mask).logits
    torch.testing.assert_close(a[0, 9:], b[0, 9:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1:], b[1:], atol=1e-5, rtol=1e-5)


def test_import_roundtrip(tiny_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ours = load_hf(tiny_model_dir).eval()
    idx = torch.randint(0, ours.shape.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    # and a Llama directory written by transformers itself imports too
    for k, v in hf.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_export_files_and_generate(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    enc = tok("the cat", return_tensors="pt")
    # greedy decoding of the exported model equals our own model's argmax continuation, token for token
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, enc["input_ids"].shape[1]:].tolist()
    from pretrain.export import load_hf

    ours = load_hf(tiny_model_dir).eval()
    ids = enc["input_ids"]
    for _ in range(6):
        with torch.no_grad():
            ids = torch.cat([ids, ours(ids)[:, -1:].argmax(-1)], 1)
    assert out == ids[0, enc["input_ids"].shape[1]:].tolist()


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    shape = shape_from_preset("tiny", 1000)
    m = Llama(shape)
    std_q = m.model.layers[0].self_attn.q_proj.weight.std().item()
    std_o = m.model.layers[0].self_attn.o_proj.weight.std().item()
    std_down = m.model.layers[0].mlp.down_proj.weight.std().item()
    assert abs(std_q - 0.02) < 1e-3
    expected = 0.02 / (2 * shape.num_hidden_layers) ** 0.5
    assert abs(std_o - expected) < 1e-3 and abs(std_down - expected) < 1e-3
    assert torch.equal(m.model.norm.weight, torch.ones(shape.hidden_size))


def test_presets_and_parameter_counts():
    counts = {name: Llama(shape_from_preset(name, 4096)).num_parameters() for name in ("test", "tiny", "10m")}
    assert counts["test"] < counts["tiny"] < counts["10m"]
    assert 8e6 < counts["10m"] < 13e6, counts
    # the big presets by formula, without allocating them: embeddings + per-layer attention/MLP/norms
    def formula(p, vocab=32768):
        s = LlamaShape(vocab_size=vocab, **p)
        kv = s.num_key_value_heads * s.head_dim
        layer = s.hidden_size * (2 * s.hidden_size + 2 * kv) + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size
        return vocab * s.hidden_size + s.num_hidden_layers * layer + s.hidden_size
    assert formula(PRESETS["tiny"], 4096) == counts["tiny"]
    assert 100e6 < formula(PRESETS["125m"]) < 150e6
    assert 0.9e9 < formula(PRESETS["1b"]) < 1.2e9


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaShape(num_attention_heads=8, num_key_value_heads=3).validate()
    m = Llama(LlamaShape(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.zeros(1, 17, dtype=torch.long))
