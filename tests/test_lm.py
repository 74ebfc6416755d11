"""Stitchable language models: transformers causal LMs as SN-Net anchors (random tiny configs, local files only)."""
from __future__ import annotations

import math

import pytest
import torch

from snnet.families import anchor_view
from snnet.families.lm import load_causal_lm
from snnet.sn_net.network import StitchableNetwork
from snnet.sn_net.stitch_configs import AnchorDepths, generate_stitch_configs

VOCAB = 64
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": LLAMA,
    "qwen2": {**LLAMA, "model_type": "qwen2"},
    "qwen3": {**LLAMA, "model_type": "qwen3", "head_dim": 8},
    "mistral": {**LLAMA, "model_type": "mistral", "sliding_window": 4},  # shorter than the sequences: the sliding mask matters
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64),
}


def tiny(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return load_causal_lm(model_type, {**CONFIGS[model_type], **overrides}).eval()


def view_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    view = anchor_view(model)
    h = view.stem(ids)
    for block in view.blocks:
        h = block(h)
    return view.head(h)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_anchor_path_equals_transformers_logits(model_type: str, attn: str) -> None:
    model = tiny(model_type)
    model.set_attn_implementation(attn)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        got = view_logits(model, ids)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-5


def test_saved_directory_loads_with_from_pretrained(tmp_path) -> None:
    model = tiny("llama", seed=3)
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_causal_lm(str(tmp_path / "tiny"))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(view_logits(loaded.eval(), ids), model(ids).logits)
    random_weights = load_causal_lm(str(tmp_path / "tiny"), pretrained=False)  # the architecture only
    assert random_weights.config.hidden_size == 32
    assert not torch.equal(random_weights.lm_head.weight, model.lm_head.weight)


def three_anchor_family(depths=(4, 4, 4), widths=(32, 48, 64), seq_len: int = 16) -> StitchableNetwork:
    anchors = [tiny("llama", seed=i, hidden_size=w, num_hidden_layers=d) for i, (d, w) in enumerate(zip(depths, widths))]
    return StitchableNetwork(anchors, names=["s", "m", "l"], input_size=(seq_len,))


def test_stitch_counts_of_a_three_anchor_family() -> None:
    net = three_anchor_family()
    # per adjacent pair, windows of 2 over 4 blocks add 4 + 3 + 3 (j, k) pairs: 20 stitches + 3 anchors
    assert net.num_configs == 23
    same = generate_stitch_configs([AnchorDepths((4,), (0,), True)] * 3, 2, 1, True, False)[0]
    assert [c.anchors for c in net.configs] == [c.anchors for c in same]
    unequal = three_anchor_family(depths=(2, 3, 4))
    expected = generate_stitch_configs([AnchorDepths((d,), (0,), True) for d in (2, 3, 4)], 2, 1, True, False)[0]
    assert unequal.num_configs == len(expected)
    # FLOPs are per token and grow with width; every stitch lies between its anchors' FLOPs or near them
    flops = [i.flops for i in net.infos[:3]]
    assert flops == sorted(flops) and flops[0] > 0


def test_forward_many_and_switching_equal_one_path_at_a_time() -> None:
    net = three_anchor_family(depths=(2, 3, 4)).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        many = net.forward_many(ids, range(net.num_configs))
        for s in range(net.num_configs):
            net.set_stitch(s)
            assert torch.equal(many[s], net(ids))
        assert torch.equal(net(ids, stitch=2), anchor_view(net.anchors[2]).head(
            _blocks(net.anchors[2], anchor_view(net.anchors[2]).stem(ids))))


def _blocks(model, h):
    for block in anchor_view(model).blocks:
        h = block(h)
    return h


def rotated_llama(model: torch.nn.Module, q: torch.Tensor, layers: int) -> torch.nn.Module:
    """A Llama whose embedding and first ``layers`` layers compute ``q @ h`` of ``model``'s hidden states
    (RMSNorm with unit weights commutes with an orthogonal ``q``); deeper layers stay random."""
    out = tiny("llama", seed=7, num_hidden_layers=4)
    with torch.no_grad():
        out.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ q.T)
        for src, dst in zip(model.model.layers[:layers], out.model.layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(dst.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight @ q.T)
            dst.self_attn.o_proj.weight.copy_(q @ src.self_attn.o_proj.weight)
            dst.mlp.gate_proj.weight.copy_(src.mlp.gate_proj.weight @ q.T)
            dst.mlp.up_proj.weight.copy_(src.mlp.up_proj.weight @ q.T)
            dst.mlp.down_proj.weight.copy_(q @ src.mlp.down_proj.weight)
    return out


def test_least_squares_recovers_a_known_map_between_hidden_states() -> None:
    small = tiny("llama", seed=5, num_hidden_layers=2)
    q = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))[0]
    large = rotated_llama(small, q, layers=1)
    net = StitchableNetwork([small, large], names=["s", "l"], input_size=(16,))
    # depths 2 -> 4: end blocks map to front blocks [0, 0, 1, 1]; layer 0 reads small's block 0 output
    # and writes large's block 1 input, which is q @ (small's block 0 output) by construction
    assert net.layer_specs[0].pairs == ((0, 1),)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(4))
    net.init_stitches_lstsq([ids])
    layer = net.stitch_layers[0]
    assert torch.allclose(layer.proj.weight, q, atol=1e-4)
    assert layer.proj.bias.abs().max() < 1e-4


def test_vocabulary_mismatch_names_both_anchors() -> None:
    with pytest.raises(ValueError, match=r"'a' \(vocabulary of 64 tokens\) and 'b' \(80 tokens\)"):
        StitchableNetwork([tiny("llama"), tiny("llama", vocab_size=80)], names=["a", "b"], input_size=(8,))


def test_bad_anchor_inputs_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_causal_lm(str(tmp_path / "no_such_model"))
    with pytest.raises(ValueError, match="'distilbert' model, not a causal language model"):
        load_causal_lm("encoder", {"model_type": "distilbert", "vocab_size": VOCAB})
    with pytest.raises(ValueError, match="BertLMHeadModel is not a supported causal language model; supported: .*LlamaForCausalLM"):
        load_causal_lm("bert", {"model_type": "bert", "vocab_size": VOCAB})
    with pytest.raises(ValueError, match="needs 'model_type'"):
        load_causal_lm("x", {"hidden_size": 32})
    with pytest.raises(ValueError, match="sequence of 80 tokens is longer than anchor .* context of 64 tokens"):
        StitchableNetwork([tiny("llama")], input_size=(80,))
    net = StitchableNetwork([tiny("llama")], input_size=(8,))
    with pytest.raises(ValueError, match="sequence of 65 tokens"):
        net(torch.zeros(1, 65, dtype=torch.int64))
