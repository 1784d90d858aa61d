"""transformers' attn_implementation="fa3" (flash_attn3.integrations.transformers) on a small Llama built
from a config with random weights (no downloads): logits equal to "sdpa" for a padded prefill and the same
greedy tokens for 32 new ones. On CPU every call falls back to transformers' sdpa (checked through
last_fallback_reason), so the results must be identical; on an SM90 GPU the unpadded calls run on the kernels."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flash_attn3  # noqa: E402
from flash_attn3.integrations import transformers as fa3_hf  # noqa: E402


def _llama(attn: str, device, dtype):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=256)
    torch.manual_seed(0)  # the same random weights for every implementation
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


def _inputs(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding, as generation uses
    mask[2, :30] = 0
    return ids.to(device), mask.to(device)


def test_register_names_the_implementation():
    assert fa3_hf.register() == "fa3"
    assert "fa3" in transformers.AttentionInterface._global_mapping
    with pytest.raises(ValueError, match="flash"):
        fa3_hf.register("flash_attn3")


def _compare(device, dtype, atol):
    fa3_hf.register()
    ids, mask = _inputs(device)
    ref, ours = _llama("sdpa", device, dtype), _llama("fa3", device, dtype)
    with torch.no_grad():
        # Padded prefill: the mask tensor sends it to transformers' sdpa (same result by construction).
        lp_ref = ref(input_ids=ids, attention_mask=mask).logits
        lp = ours(input_ids=ids, attention_mask=mask).logits
        assert fa3_hf.last_fallback_reason() is not None and "mask" in fa3_hf.last_fallback_reason()
        torch.testing.assert_close(lp, lp_ref, atol=atol, rtol=0)
        # Unpadded prefill: causal with no mask, the kernels' case on an SM90 GPU.
        lu_ref = ref(input_ids=ids).logits
        lu = ours(input_ids=ids).logits
        torch.testing.assert_close(lu, lu_ref, atol=atol, rtol=0)
    gen_ref = ref.generate(ids[:1], max_new_tokens=32, do_sample=False, pad_token_id=0)
    gen = ours.generate(ids[:1], max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_ref), f"greedy tokens differ:\n{gen}\n{gen_ref}"


def test_llama_cpu_matches_sdpa_exactly():
    _compare("cpu", torch.float32, atol=0.0)
    assert fa3_hf.last_fallback_reason() is not None  # CPU: never the kernels


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn3.is_available(), reason=str(flash_attn3.unavailable_reason()))
def test_llama_gpu_matches_sdpa():
    # bf16 logits of a 2-layer model: both implementations round differently, within a few bf16 ulps of |logit|.
    _compare("cuda", torch.bfloat16, atol=3e-2)
    with torch.no_grad():
        ids, _ = _inputs("cuda")
        _llama("fa3", "cuda", torch.bfloat16)(input_ids=ids)
    assert fa3_hf.last_fallback_reason() is None, fa3_hf.last_fallback_reason()
