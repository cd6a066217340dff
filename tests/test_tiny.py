"""Tiny local models: deterministic tokenizer and weights, loadable by transformers."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignx_ray.common import prompts
from alignx_ray.fixtures.tiny import TinyModelSpec, build_tiny_model


def test_same_seed_same_tokenizer_and_weights(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    assert json.loads((again / "tokenizer.json").read_text()) == json.loads(
        (tiny_model_dir / "tokenizer.json").read_text()
    )
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_seed_other_weights(tmp_path, tiny_model_dir):
    other = build_tiny_model(tmp_path / "other", TinyModelSpec(seed=1))
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_llama_arch_and_chat_template(tmp_path):
    out = build_tiny_model(tmp_path / "llama", TinyModelSpec(arch="llama", seed=3))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM CPU attention
    text = prompts.render_chat(tok, "hello there", system="be brief")
    assert (
        text
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_option_digits_are_single_tokens(tiny_tokenizer):
    ids = prompts.option_token_ids(tiny_tokenizer)
    assert len(set(ids)) == 3
    assert [tiny_tokenizer.decode([i]) for i in ids] == ["1", "2", "3"]
