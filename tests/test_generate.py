"""Generation along a stitch's path: token-exact with transformers' own greedy ``generate`` on anchors,
KV-cached steps equal to recomputing the whole sequence on stitched paths, a left-padded batch equal
to its prompts one by one (tiny random configs of every supported architecture, local files only)."""
from __future__ import annotations

import pytest
import torch

from snnet.sn_net.generate import Sampling, generate, left_pad
from snnet.sn_net.network import StitchableNetwork
from test_lm import CONFIGS, VOCAB, tiny

# a larger initialisation than transformers' default: random logits that depend on the context, so
# the generated tokens vary and a wrong position, mask or cache changes them
INIT = 0.3
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]


def width(model_type: str, w: int) -> dict:
    return {"n_embd": w} if model_type == "gpt2" else {"hidden_size": w}


def family(model_type: str, attn: str = "sdpa") -> StitchableNetwork:
    anchors = [tiny(model_type, seed=i, initializer_range=INIT, **width(model_type, w)) for i, w in enumerate((32, 64))]
    for anchor in anchors:
        anchor.set_attn_implementation(attn)
    return StitchableNetwork(anchors, names=["s", "l"], input_size=(8,)).eval()


def recomputed(net: StitchableNetwork, ids: torch.Tensor, stitch: int, steps: int) -> torch.Tensor:
    """Greedy tokens by the packed forward over the whole sequence at every step (no cache, no mask)."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, net(seq, stitch)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_anchor_path_greedy_equals_transformers_generate(model_type: str, attn: str) -> None:
    net = family(model_type, attn)
    ids, mask = left_pad(PROMPTS)
    for anchor in range(net.num_anchors):
        model = net.anchors[anchor]
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[:, ids.shape[1]:]
        got = generate(net, ids, anchor, 24, attention_mask=mask)
        assert torch.equal(got, expected)
        assert len(set(got[1].tolist())) > 3  # the tokens vary: positions and the cache matter
        # a stop token: the row ends with it, padded as transformers pads after its eos
        stop = int(expected[1, 5])
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=stop,
                                  pad_token_id=0)[:, ids.shape[1]:]
        got = generate(net, ids, anchor, 24, attention_mask=mask, stop_tokens=[stop], pad_id=0)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_cached_stitched_paths_equal_recomputing_the_sequence(model_type: str) -> None:
    net = family(model_type)
    ids = torch.tensor([PROMPTS[1], PROMPTS[1][::-1]])
    assert net.num_configs > 2
    for stitch in range(net.num_configs):
        expected = recomputed(net, ids, stitch, 16)
        assert torch.equal(generate(net, ids, stitch, 16), expected)
        assert torch.equal(generate(net, ids, stitch, 16, use_cache=False), expected)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_left_padded_batch_equals_prompts_one_by_one(model_type: str) -> None:
    net = family(model_type)
    ids, mask = left_pad(PROMPTS)
    for stitch in (0, net.num_anchors, net.num_configs - 1):  # an anchor and two stitched paths
        batch = generate(net, ids, stitch, 12, attention_mask=mask)
        for row, prompt in enumerate(PROMPTS):
            assert torch.equal(batch[row], generate(net, torch.tensor([prompt]), stitch, 12)[0])


def test_sampling_filters_as_transformers_warpers() -> None:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.9, 10, 0.8)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = Sampling(temperature, top_k, top_p).filter(logits)
        assert torch.equal(got.isinf(), expected.isinf())
        assert torch.allclose(got[~got.isinf()], expected[~expected.isinf()])
    # a draw only ever picks an allowed token; a seeded generator repeats it
    sampling = Sampling(1.0, top_k=3)
    allowed = logits.topk(3, dim=-1).indices
    draws = torch.stack([sampling.choose(logits, torch.Generator().manual_seed(s)) for s in range(20)], dim=1)
    assert (draws[:, :, None] == allowed[:, None, :]).any(-1).all()
    assert torch.equal(sampling.choose(logits, torch.Generator().manual_seed(1)), draws[:, 1])
    assert torch.equal(Sampling(2.0, top_k=1).choose(logits), logits.argmax(-1))


def test_sampled_generation_is_reproducible_and_cached_equals_recomputed() -> None:
    net = family("llama")
    ids, mask = left_pad(PROMPTS)
    sampling = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    runs = [generate(net, ids, net.num_configs - 1, 16, attention_mask=mask, sampling=sampling, use_cache=cache,
                     generator=torch.Generator().manual_seed(3)) for cache in (True, True, False)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_bad_generation_inputs_name_the_value() -> None:
    net = family("llama")
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match=r"prompt of 3 tokens plus 70 new tokens is longer than stitch 0's context of 64 tokens; "
                                         r"ask for at most 62"):
        generate(net, ids, 0, 70)
    assert generate(net, ids, 0, 62).shape == (1, 62)
    with pytest.raises(ValueError, match="left padding"):
        generate(net, ids, 0, 4, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"int64"):
        generate(net, ids.float(), 0, 4)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        Sampling(temperature=1, top_p=0)
    with pytest.raises(ValueError, match="at least one token per prompt"):
        left_pad([[1, 2], []])
