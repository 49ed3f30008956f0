"""Small models of every registered family, made in the test (no hub): a real tokenizer of the
family's kind trained on WikiText-2 validation text, and random weights from a transformers
config, with the norms and biases randomised too (so a missing norm offset or bias is visible).

Tokenizer kinds, as the families ship them:
- bpe-llama3: byte-level BPE with Llama 3's split regex, BOS added by the post-processor;
- bpe-qwen2: byte-level BPE with Qwen2's regex (digits one by one), NFC, no BOS, ChatML tokens;
- spm-llama: SentencePiece BPE with byte fallback and a dummy prefix (Llama 2, Mistral, Phi-3);
- spm-gemma: SentencePiece as Gemma's (no dummy prefix; pad 0, eos 1, bos 2, unk 3).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from haloquant.pretokenizers import LLAMA3, QWEN2

REPO = Path(__file__).resolve().parent.parent
CALIB_TEXT = REPO / "data" / "wikitext-2-raw" / "wiki.valid.raw"
VOCAB = 1024

CHAT_TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "gemma": ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}"
              "<start_of_turn>model\n{% endif %}"),
    "phi3": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}


@functools.cache
def training_lines() -> tuple[str, ...]:
    lines = [ln for ln in CALIB_TEXT.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return tuple(lines[:6000])


def _bpe(kind: str, out: Path) -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe-llama3":
        specials, regex, bos, eos, template = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                "<|end_header_id|>", "<|eot_id|>"], LLAMA3, "<|begin_of_text|>",
                                               "<|eot_id|>", CHAT_TEMPLATES["llama3"])
    else:
        specials, regex, bos, eos, template = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN2, None,
                                               "<|im_end|>", CHAT_TEMPLATES["chatml"])
    tok = Tokenizer(models.BPE(ignore_merges=kind == "bpe-llama3"))
    if kind == "bpe-qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(training_lines(), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 pad_token=specials[0] if bos is None else None, chat_template=template)
    hf.save_pretrained(out)
    return {"bos_token_id": None if bos is None else tok.token_to_id(bos), "eos_token_id": tok.token_to_id(eos),
            "n_tokens": tok.get_vocab_size()}


def _spm(kind: str, out: Path) -> dict:
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    gemma = kind == "spm-gemma"
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    user = ["<start_of_turn>", "<end_of_turn>"] if gemma else []
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, add_dummy_prefix=not gemma,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, user_defined_symbols=user, minloglevel=2, **ids)
    if gemma:
        from transformers import GemmaTokenizerFast

        hf = GemmaTokenizerFast(vocab_file=str(out / "tokenizer.model"), chat_template=CHAT_TEMPLATES["gemma"])
    else:
        from transformers import LlamaTokenizerFast

        # the tokenizer.json that Llama 2, Mistral and Phi-3 ship: Prepend("▁") + Replace(" ", "▁"), i.e.
        # SentencePiece's dummy prefix, as llama.cpp applies it
        hf = LlamaTokenizerFast(vocab_file=str(out / "tokenizer.model"), legacy=True, add_prefix_space=True,
                                from_slow=True, add_bos_token=True,
                                chat_template=CHAT_TEMPLATES["phi3" if kind == "spm-phi3" else "llama3"])
        if kind == "spm-phi3":  # Phi-3's chat tokens sit after the SentencePiece vocabulary and swallow the
            from tokenizers import AddedToken  # whitespace after them (rstrip; llama.cpp does so for phi3 files)

            hf.add_special_tokens({"additional_special_tokens": [
                AddedToken(t, rstrip=t != "<|endoftext|>", lstrip=False, normalized=False, special=True)
                for t in ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")]})
    hf.save_pretrained(out)
    return {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "n_tokens": len(hf)}


@dataclass(frozen=True)
class Case:
    """One small model of a registered family."""

    family: str
    config_class: str  # transformers config class
    tokenizer: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    tied: bool
    extra: dict = field(default_factory=dict)  # more config keys (head_dim, biases, rope scaling, …)
    vocab_pad: int = 0  # config vocab beyond the tokenizer's (padded embeddings, as Qwen2.5 and Gemma 3)
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.family}-w{self.hidden}-{'tied' if self.tied else 'untied'}"


def make_model(case: Case, out: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Write a random-weight HF folder for `case` under out/<case.id>; returns it."""
    import transformers

    folder = out / case.id
    if (folder / "config.json").is_file():
        return folder
    tok = _bpe(case.tokenizer, folder) if case.tokenizer.startswith("bpe") else _spm(case.tokenizer, folder)
    cls = getattr(transformers, case.config_class)
    cfg = cls(vocab_size=tok["n_tokens"] + case.vocab_pad, hidden_size=case.hidden, intermediate_size=case.ffn,
              num_hidden_layers=n_layers, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
              max_position_embeddings=1024, tie_word_embeddings=case.tied, initializer_range=0.08,
              bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], **case.extra)
    cfg.architectures = [cfg.__class__.__name__.removesuffix("Config").removesuffix("Text") + "ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms around their neutral value (0 for Gemma's 1 + w), biases around 0
                neutral = 0.0 if name.endswith("bias") or case.family.startswith("gemma") else 1.0
                p.copy_(neutral + 0.2 * torch.randn_like(p))
    model.to(getattr(torch, case.dtype)).save_pretrained(folder)
    cfg_json = json.loads((folder / "config.json").read_text())
    assert cfg_json["architectures"] == cfg.architectures
    return folder


CASES = (
    Case("llama", "LlamaConfig", "bpe-llama3", 256, 512, 4, 2, tied=False,
         extra={"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    Case("llama", "LlamaConfig", "bpe-llama3", 384, 640, 6, 2, tied=True, dtype="bfloat16"),
    Case("mistral", "MistralConfig", "spm-llama", 320, 768, 5, 5, tied=False, extra={"sliding_window": None}),
    Case("qwen2", "Qwen2Config", "bpe-qwen2", 256, 768, 4, 2, tied=False, vocab_pad=64),
    Case("qwen2", "Qwen2Config", "bpe-qwen2", 448, 1216, 7, 1, tied=True, vocab_pad=64),
    Case("qwen3", "Qwen3Config", "bpe-qwen2", 320, 832, 4, 2, tied=True, extra={"head_dim": 64}),
    Case("qwen3", "Qwen3Config", "bpe-qwen2", 512, 1024, 8, 4, tied=False, extra={"head_dim": 64}),
    Case("gemma2", "Gemma2Config", "spm-gemma", 256, 512, 4, 2, tied=True,
         extra={"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 1024}),
    Case("gemma2", "Gemma2Config", "spm-gemma", 320, 640, 5, 1, tied=True,
         extra={"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 1024}),
    Case("gemma3", "Gemma3TextConfig", "spm-gemma", 256, 768, 4, 1, tied=True, vocab_pad=64,
         extra={"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 64}),
    Case("gemma3", "Gemma3TextConfig", "spm-gemma", 640, 1024, 4, 1, tied=True,
         extra={"head_dim": 128, "query_pre_attn_scalar": 128, "sliding_window": 512}),
    Case("phi3", "Phi3Config", "spm-phi3", 256, 512, 4, 4, tied=False,
         extra={"original_max_position_embeddings": 1024, "pad_token_id": None}),
    Case("phi3", "Phi3Config", "spm-phi3", 384, 640, 6, 2, tied=False,
         extra={"original_max_position_embeddings": 1024, "partial_rotary_factor": 0.75, "pad_token_id": None}),
)
