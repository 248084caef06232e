"""Every architecture kvsqueeze accepts, through ``generate``: ``none`` equals transformers' ``DynamicCache`` exactly,
``snapkv`` at ratio 0.5 holds at most 0.55 of the full cache's bytes, and the model is left as it was (a plain
forward after ``generate`` is bit-identical to one before). Architectures that cannot work are refused at
construction with one line naming them and why."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

from kvsqueeze import CompressedCache, KVSqueezeError

PROMPT = 160  # longer than the sliding windows below, so windows bind
WINDOW = 96


def small(config_cls, model_cls, **extra):
    def build():
        torch.manual_seed(0)
        base = dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        base.update(extra)
        return model_cls(config_cls(**base)).eval()

    return build


ARCHITECTURES = {
    "llama": small(tf.LlamaConfig, tf.LlamaForCausalLM),
    "qwen2": small(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": small(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16),
    "mistral": small(tf.MistralConfig, tf.MistralForCausalLM),  # default sliding_window=4096 on every layer
    "mistral-window": small(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=WINDOW),
    "phi3": small(tf.Phi3Config, tf.Phi3ForCausalLM, pad_token_id=0),
    "gemma": small(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=16),
    # a logit softcap that binds (large weights, cap 1); eager attention
    "gemma2": small(
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        head_dim=16,
        sliding_window=WINDOW,
        attn_logit_softcapping=1.0,
        initializer_range=0.5,
        attn_implementation="eager",  # sdpa cannot softcap (transformers < 5.24 silently skipped it)
    ),
    "gemma3": small(
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gpt_neox": small(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
    "starcoder2": small(tf.Starcoder2Config, tf.Starcoder2ForCausalLM, sliding_window=WINDOW),
    "olmo": small(tf.OlmoConfig, tf.OlmoForCausalLM, pad_token_id=0),
    # attention sinks; eager attention
    "gpt_oss": small(
        tf.GptOssConfig,
        tf.GptOssForCausalLM,
        head_dim=16,
        sliding_window=WINDOW,
        num_local_experts=2,
        num_experts_per_tok=1,
    ),
}


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512)).eval()


ARCHITECTURES["gpt2"] = gpt2


def ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def step_logits(model, cache, prompt, steps: int = 6) -> torch.Tensor:
    """Logits of the prompt's last position, then of greedy tokens fed one by one."""
    out = []
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.stack(out)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_none_is_dynamic_cache_and_snapkv_halves_the_bytes(arch):
    model = ARCHITECTURES[arch]()
    prompt = ids()
    with torch.no_grad():
        before = model(prompt).logits
    reference = step_logits(model, DynamicCache(config=model.config), prompt)
    assert torch.equal(step_logits(model, CompressedCache(model, "none"), prompt), reference)

    cache = CompressedCache(model, "snapkv", ratio=0.5)
    cache.prefill(model, prompt)
    assert cache.nbytes() <= 0.55 * cache.full_nbytes(), arch
    answer = cache.fork()
    question = torch.cat([prompt, ids(4, seed=1)], dim=-1)
    with torch.no_grad():
        out = model.generate(question, past_key_values=answer, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[-1] == PROMPT + 4 + 8
    with torch.no_grad():
        after = model(prompt).logits
    assert torch.equal(before, after)  # the model is left as it was
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_falcon_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = tf.FalconForCausalLM(
        tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    ).eval()
    with pytest.raises(KVSqueezeError, match=r"unsupported architecture FalconForCausalLM: .*attention interface"):
        CompressedCache(model, "snapkv")


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "mistral-window", "gemma3", "starcoder2", "llama"])
@pytest.mark.parametrize("method", ["snapkv", "snapkv+adakv", "knorm+int:bits=8"])
def test_decode_over_compressed_storage_applies_softcap_sinks_and_windows(arch, method):
    """At ratio 0 nothing is evicted but every decode step attends over kvsqueeze's storage (dense front, ragged
    blocks or packed codes): Gemma-2's logit softcap, GPT-OSS's attention sinks and sliding windows must give the
    model's own logits (a different code path: float32 tolerance; 8-bit codes: their quantization error)."""
    model = ARCHITECTURES[arch]()
    prompt = ids()
    reference = step_logits(model, DynamicCache(config=model.config), prompt, steps=8)
    cache = CompressedCache(model, method, ratio=0.0)
    got = step_logits(model, cache, prompt, steps=8)
    assert all(layer.compressed for layer in cache.layers)
    tolerance = 0.05 if "int" in method else 1e-4
    torch.testing.assert_close(got, reference, atol=tolerance, rtol=0)


def test_sdpa_that_would_skip_the_softcap_is_refused():
    """transformers before 5.24 ran Gemma-2 on sdpa without its logit softcap; a cache never pretends to match it."""
    model = ARCHITECTURES["gemma2"]()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(KVSqueezeError, match="softcap"):
        CompressedCache(model, "snapkv", ratio=0.5)
