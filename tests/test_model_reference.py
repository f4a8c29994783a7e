"""Cross-checks against transformers' reference Qwen2 and SigLIP implementations (same weights).

They pin RoPE, GQA, RMSNorm, SwiGLU, the pre-LN SigLIP block, post-LN and the Conv -> Linear patch
embedding order (model.md 4) to independent code.
"""

from __future__ import annotations

import torch

from bagel_core.model.attention import packed_attention
from bagel_core.model.config import LLMConfig, ViTConfig
from bagel_core.model.qwen2_mot import Qwen2ForCausalLM, Routing
from bagel_core.model.siglip_navit import SiglipVisionModel
from bagel_core.sequence.grid import patchify
from bagel_core.sequence.layout import PackedLayout


def _causal_logits(ours, ids: torch.Tensor) -> torch.Tensor:
    """Our LM over one causal document (packed path, understanding expert) -> logits."""
    n = ids.shape[0]
    layout = PackedLayout.documents([n], "causal")
    hidden = ours.model(
        ours.model.embed_tokens(ids),
        torch.arange(n),
        Routing.all_und(n),
        lambda _i, q, k, v: packed_attention(q, k, v, layout),
    )
    return ours.lm_head(hidden)


def test_plain_qwen2_matches_transformers():
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM as HFQwen2

    cfg = LLMConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        qk_norm=False,
        layer_module="Qwen2DecoderLayer",
    )
    torch.manual_seed(0)
    ours = Qwen2ForCausalLM(cfg).eval()
    hf_cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = HFQwen2(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, 300, (1, 11))
    with torch.no_grad():
        want = hf(input_ids=ids).logits[0]
        got = _causal_logits(ours, ids[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_qk_norm_matches_transformers_qwen3_attention():
    """Qwen3 applies the same per-head RMSNorm to q and k before RoPE (BAGEL's qk_norm)."""
    from transformers import Qwen3Config
    from transformers import Qwen3ForCausalLM as HFQwen3

    cfg = LLMConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        qk_norm=True,
        layer_module="Qwen2DecoderLayer",
    )
    torch.manual_seed(0)
    ours = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights
    hf_cfg = Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=True,
        attn_implementation="eager",
    )
    hf = HFQwen3(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k or "o_proj.bias" in k for k in missing)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()  # BAGEL's o_proj has no bias
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        want = hf(input_ids=ids).logits[0]
        got = _causal_logits(ours, ids[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_siglip_navit_matches_transformers_with_converted_patch_conv():
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel as HFSiglip

    cfg = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=42,
    )
    hf_cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=42,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = HFSiglip(hf_cfg).eval()
    state = {}
    for k, v in hf.state_dict().items():
        key = k.removeprefix("vision_model.")
        if key == "embeddings.patch_embedding.weight":
            v = v.permute(0, 2, 3, 1).reshape(v.shape[0], -1)  # (out, row, col, channel)
        if key.startswith("head."):
            continue
        state["vision_model." + key] = v
    ours = SiglipVisionModel(cfg).eval()
    ours.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        want = hf(pixel_values=images).last_hidden_state  # [2, 9, 32], post-LN applied
        patches = torch.cat([patchify(img, 14) for img in images])
        ids = torch.arange(9).repeat(2)  # row*3+col, side 3 = image_size/patch
        got = ours(patches, ids, [9, 9])
    torch.testing.assert_close(got.view(2, 9, 32), want, atol=1e-5, rtol=1e-4)
