"""The LLM demo (scripts/llm_demo.py) on the bundled TinyLM and on a tiny local Hugging Face GPT-2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medlora.llm import ByteTokenizer, TinyLM, TinyLMConfig, corpus_text, lm_loss, pretrained_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("llm_demo", ROOT / "scripts" / "llm_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tokenizer_and_model_shapes():
    tok = ByteTokenizer()
    text = "CT chest: no nodule. Größe"
    assert tok.decode(tok.encode(text)) == text
    model = TinyLM(TinyLMConfig(context=16, dim=32, n_layers=1))
    batch = tok.encode(corpus_text())[:34].view(2, 17)
    assert model(batch[:, :-1]).shape == (2, 16, 256)
    assert lm_loss(model, batch).item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.1)
    assert "# Part 2" in corpus_text() and len(corpus_text()) > 4000


def test_pretrained_checkpoint_is_cached(tmp_path):
    cfg = TinyLMConfig(context=16, dim=32, n_layers=1)
    a = pretrained_tiny_lm("some text to learn from, twice. " * 4, steps=3, cfg=cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tiny_lm_*.pt"))) == 1
    b = pretrained_tiny_lm("some text to learn from, twice. " * 4, steps=3, cfg=cfg, cache_dir=tmp_path)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_demo_two_methods_and_a_rule(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = _demo().main([
        "--methods", "lora,dora", "--rules", "lora_pro,ffa", "--steps", "4", "--pretrain-steps", "5",
        "--context", "32", "--rank", "4", "--cache-dir", str(tmp_path), "--json", str(out),
    ])
    printed = capsys.readouterr().out
    assert "| method | rule | trainable params | loss before | loss after | steps/s |" in printed
    assert [(r["method"], r["rule"]) for r in rows] == [
        ("full fine-tuning", "adamw"), ("lora", "adamw"), ("dora", "adamw"), ("lora", "lora_pro"), ("lora", "ffa")]
    assert json.loads(out.read_text(encoding="utf-8")) == rows
    full, lora, dora, pro, ffa = rows
    assert pro["trainable"] == lora["trainable"]
    assert ffa["trainable"] == 2 * (4 * 4 * 64 + 4 * (256 + 64))  # only the B factors
    # rank 4 on q/k/v/o (64x64) and fc1 (256x64), fc2 (64x256), two blocks
    assert lora["trainable"] == 2 * (4 * 4 * (64 + 64) + 2 * 4 * (64 + 256))
    assert dora["trainable"] == lora["trainable"] + 2 * (4 * 64 + 256 + 64)
    assert full["trainable"] > 10 * lora["trainable"]
    for r in rows:
        assert r["loss_after"] < r["loss_before"]
    assert lora["loss_before"] == pytest.approx(full["loss_before"])  # adapters start at the base model


def test_demo_skips_a_method_that_cannot_be_built(tmp_path, capsys, monkeypatch):
    demo = _demo()
    rows = demo.main(["--methods", "lora", "--rules", "adamw", "--steps", "2", "--pretrain-steps", "2",
                      "--context", "16", "--cache-dir", str(tmp_path), "--no-full", "--rank", "0"])
    assert "skipping lora / adamw" in capsys.readouterr().out
    assert rows[0]["skipped"].startswith("ValueError")


def test_demo_on_a_local_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    rows = _demo().main(["--model", str(tmp_path), "--methods", "lora", "--rules", "altlora_plus",
                         "--steps", "3", "--context", "32", "--rank", "4", "--no-full"])
    assert [r["method"] for r in rows] == ["lora", "lora"]
    # GPT-2's attention/MLP are transformers Conv1D layers: c_attn, c_proj (x2), c_fc, rank 4
    assert rows[0]["trainable"] == 4 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    assert all(r["loss_after"] < r["loss_before"] for r in rows)


def test_unet_table_script_smoke(tmp_path, capsys):
    pytest.importorskip("monai")
    spec = importlib.util.spec_from_file_location("methods_unet_table", ROOT / "scripts" / "methods_unet_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--methods", "lora,svd", "--rules", "ffa", "--steps", "3", "--pretrain-steps", "3",
                        "--size", "8", "--json", str(tmp_path / "unet.json")])
    assert [(r["method"], r["rule"]) for r in rows] == [
        ("full fine-tuning", "adamw"), ("lora", "adamw"), ("svd", "adamw"), ("lora", "ffa")]
    full, lora, svd, ffa = rows
    assert full["percent"] == pytest.approx(100.0) and 0 < svd["percent"] < lora["percent"] < 100
    assert ffa["trainable"] * 2 < lora["trainable"]  # FFA: A frozen
    assert lora["loss_before"] == pytest.approx(full["loss_before"])
    assert "| step time vs full FT |" in capsys.readouterr().out
