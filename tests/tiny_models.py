"""Tiny random-config models of every supported family, built in the tests (nothing downloaded).

Causal families use the default model's byte-level BPE tokenizer (so leading-space handling is the
real thing); BERT gets a WordPiece tokenizer built from a small vocabulary written here; RoBERTa the
byte-level tokenizer with a ``<mask>`` token added.
"""
from __future__ import annotations

import functools
import string
import tempfile
from pathlib import Path

import torch
import transformers as T

import kn_utils as ku
from kn_utils.models import convert_gguf, default_gguf_path

H, L, HEADS, FF = 32, 3, 4, 64

_WORDS = """the a an this that these those one two both every some any all my our is are was were has
have run runs see sees capital of france paris city country man men woman women dog dogs cat cats
boy boys girl girls book books sketch sketches child children person people mouse mice himself
herself themselves itself sell selling raymond bought buying big small red old new london berlin
canada ottawa germany rome italy . , ? !""".split()


def _causal_specs(vocab, bos, eos):
    ids = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    gqa = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=2,
               intermediate_size=FF)
    return {
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=H, n_layer=L, n_head=HEADS, n_inner=FF)),
        "gptj": (T.GPTJConfig, T.GPTJForCausalLM,
                 dict(n_embd=H, n_layer=L, n_head=HEADS, n_inner=FF, rotary_dim=4)),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM,
                     dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                          intermediate_size=FF)),
        "opt": (T.OPTConfig, T.OPTForCausalLM,
                dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, ffn_dim=FF,
                     word_embed_proj_dim=H)),
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, gqa),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, gqa),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, gqa),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(gqa, head_dim=8)),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(gqa, head_dim=8)),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, gqa),
    }, ids


CAUSAL_FAMILIES = ("gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2", "gemma2", "gemma3",
                   "phi3")
MASKED_FAMILIES = ("bert", "roberta")
FAMILIES = MASKED_FAMILIES + CAUSAL_FAMILIES


@functools.lru_cache(maxsize=None)
def default_tokenizer_dir() -> Path:
    """The default model's converted folder (converted once per cache; ~30 s the first time)."""
    return convert_gguf(default_gguf_path())


def bpe_tokenizer():
    return T.AutoTokenizer.from_pretrained(default_tokenizer_dir())


@functools.lru_cache(maxsize=None)
def _bert_vocab_file() -> str:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_letters)
    pieces += ["##" + c for c in string.ascii_lowercase] + _WORDS
    pieces += [w.capitalize() for w in _WORDS if w.isalpha()]
    seen = list(dict.fromkeys(pieces))
    path = Path(tempfile.mkdtemp(prefix="kn-bert-vocab-")) / "vocab.txt"
    path.write_text("\n".join(seen) + "\n")
    return str(path)


def bert_tokenizer():
    return T.BertTokenizer(_bert_vocab_file(), do_lower_case=False)


def tiny_model(family: str, seed: int = 0):
    """(model, tokenizer) of ``family`` with random weights, fp32, eval mode."""
    torch.manual_seed(seed)
    if family == "bert":
        tok = bert_tokenizer()
        cfg = T.BertConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=L,
                           num_attention_heads=HEADS, intermediate_size=FF, pad_token_id=tok.pad_token_id)
        model = T.BertForMaskedLM(cfg)
    elif family == "roberta":
        tok = bpe_tokenizer()
        tok.add_special_tokens({"mask_token": "<mask>"})
        cfg = T.RobertaConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=L,
                              num_attention_heads=HEADS, intermediate_size=FF,
                              pad_token_id=tok.pad_token_id or 0, max_position_embeddings=130)
        model = T.RobertaForMaskedLM(cfg)
    else:
        tok = bpe_tokenizer()
        specs, ids = _causal_specs(len(tok), tok.bos_token_id, tok.eos_token_id)
        config_cls, model_cls, kwargs = specs[family]
        model = model_cls(config_cls(**ids, **kwargs))
    return model.eval(), tok


def tiny_lm(family: str, seed: int = 0) -> ku.LanguageModel:
    model, tok = tiny_model(family, seed)
    return ku.load_model(model, tokenizer=tok, device="cpu")


def save_tiny(family: str, folder, seed: int = 0) -> str:
    """Write a tiny model and its tokenizer to ``folder`` (for code that loads by path)."""
    model, tok = tiny_model(family, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def snapshot(lm):
    """Copies of every parameter of ``lm.model`` by name (to check a restore bit for bit)."""
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


def assert_same(lm, snap):
    """Every parameter of ``lm.model`` equals its copy in ``snap`` exactly."""
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, snap[name]), name
