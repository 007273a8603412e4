"""Base models: a local folder, a hub id (passed through), and a .gguf file written here from the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM  # noqa: E402

from streamengine.config.settings import LoraSettings  # noqa: E402
from streamengine.errors import TrainingError  # noqa: E402
from streamengine.local.tinymodel import CHAT_TEMPLATE, build_tiny_model  # noqa: E402
from streamengine.training.data import render_prompt  # noqa: E402
from streamengine.training.model import load_for_training, source_args  # noqa: E402
from streamengine.training.recipe import train  # noqa: E402
from tests.training_tools import make_spec, write_samples  # noqa: E402


def _permute(weight: Any, heads: int) -> Any:
    """llama.cpp's rotary permutation of q/k rows (transformers undoes it when loading GGUF)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_gguf(folder: Path, out: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """The tiny Llama of ``folder`` as a float32 GGUF file, with a byte-level llama tokenizer.

    Token ids match the ByT5 tokenizer's (pad 0, eos 1, unk 2, byte b at 3 + b), so the weights carry over.
    """
    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    tokens = ["<pad>", "</s>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    extra = cfg.vocab_size - len(tokens)
    tokens += [f"<extra_id_{i}>" for i in range(extra)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 3, 2] + [6] * 256 + [4] * extra)  # control, unknown, byte, user-defined
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_pad_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        )
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_sources() -> None:
    assert source_args("/models/llama") == ("/models/llama", {})
    assert source_args("meta-llama/Llama-3.2-1B") == ("meta-llama/Llama-3.2-1B", {})  # a hub id, as is
    with pytest.raises(TrainingError, match=r"GGUF base model /nowhere/m\.gguf does not exist"):
        source_args("/nowhere/m.gguf")


def test_a_gguf_base_loads_dequantized_with_its_chat_template_and_trains(tiny_base: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny_base, tmp_path / "gguf" / "tiny.gguf")
    assert source_args(str(path)) == (str(path.parent), {"gguf_file": "tiny.gguf"})
    loaded = load_for_training(str(path), LoraSettings(r=4, alpha=8, dropout=0.0), None, "cpu")
    reference = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids = torch.tensor([[5, 70, 80, 90, 100, 1]])
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(input_ids=ids).logits, reference(ids).logits, atol=1e-5)
    tok = loaded.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    assert render_prompt(tok, "hi") == "<|user|>hi\n<|assistant|>"
    assert tok.decode(tok("héllo wörld", add_special_tokens=False)["input_ids"]) == "héllo wörld"

    samples = write_samples(tmp_path / "s.jsonl", [("What is 2+2?", "4"), ("Capital of France?", "Paris")])
    result = train(make_spec(path, samples, tmp_path / "out", epochs=3))
    assert result.eval_loss_after < result.eval_loss_before
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_gguf_without_chat_template_uses_the_plain_fallback(tiny_base: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny_base, tmp_path / "plain.gguf", chat_template=None)
    loaded = load_for_training(str(path), LoraSettings(r=4, alpha=8), None, "cpu")
    assert not loaded.tokenizer.chat_template
    assert render_prompt(loaded.tokenizer, [{"role": "user", "content": "hi"}]) == "user: hi\nassistant: "
    with pytest.raises(TrainingError, match=r"quantization of a \.gguf base is not supported"):
        load_for_training(str(path), LoraSettings(), None, "cpu", "4bit")
