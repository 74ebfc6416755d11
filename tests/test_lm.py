"""Stitchable language models: transformers causal LMs as SN-Net anchors (random tiny configs, local files only)."""
from __future__ import annotations

import math
import shutil

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


# --- training: the SN-Net module, the text datamodule and the CLI on a tiny LM family --------------
def save_family(root, widths=(16, 32, 48), depth: int = 2, seq_len: int = 16) -> list[str]:
    from snnet.quickstart_lm import quickstart_lm_config

    dirs = []
    for i, width in enumerate(widths):
        torch.manual_seed(i)
        model = load_causal_lm(f"w{width}", quickstart_lm_config(width, depth=depth, seq_len=seq_len))
        model.save_pretrained(root / f"w{width}")
        dirs.append(str(root / f"w{width}"))
    return dirs


def fit_config(tmp_path, dirs: list[str], steps: int = 6) -> dict:
    ckpt = {"dirpath": str(tmp_path / "checkpoints"), "save_top_k": -1, "every_n_train_steps": 3, "filename": "{step}"}
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": ckpt},
                                  {"class_path": "snnet.callbacks.StitchReport", "init_args": {"out_dir": str(tmp_path)}}]},
        "model": {"class_path": "snnet.sn_net.module.SNNetModule", "init_args": {
            "network": {"anchors": [{"name": d, "source": "transformers"} for d in dirs], "input_size": [16]},
            "optim": {"lr": 0.003, "warmup_steps": 2},
            "distill": {"teacher": "largest_anchor", "kind": "soft", "temperature": 2.0},
            "stitch_init": {"images": 8, "batch_size": 4},
        }},
        "data": {"class_path": "snnet.text_data.TextDataModule", "init_args": {
            "corpus": "python_stdlib", "max_bytes": 100_000, "batch_size": 4, "train_limit": 4 * steps, "val_limit": 8}},
    }


def run_fit(tmp_path, config: dict, *args: str) -> None:
    import yaml

    from snnet.cli import main

    path = tmp_path / "fit.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), *args])


def test_fit_writes_ppl_rows_and_resume_is_bit_exact(tmp_path) -> None:
    import json

    dirs = save_family(tmp_path / "anchors")
    first, second = tmp_path / "first", tmp_path / "second"
    run_fit(first, fit_config(first, dirs))
    rows = json.loads((first / "fit_results.json").read_text())
    stitches, figures = rows["stitches"], rows["figures"]
    assert len(stitches) == 3 + 2 * 4  # depth 2: one window, pairs (0,0) (0,1) (1,0) (1,1) per adjacent pair
    for row in stitches:
        assert {"id", "name", "flops", "params", "is_anchor", "ppl", "loss", "acc1"} <= set(row)
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
        assert 1.0 < row["ppl"] < 256  # byte-level: at most uniform after a few steps
    assert figures["metric"] == "ppl"
    # the same run resumed from its step-3 checkpoint ends with the same tensors, bit for bit
    run_fit(second, fit_config(second, dirs), "--ckpt_path", str(first / "checkpoints" / "step=3.ckpt"))
    a = torch.load(first / "checkpoints" / "step=6.ckpt", weights_only=True)["state_dict"]
    b = torch.load(second / "checkpoints" / "step=6.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "fit_results.json").read_text())["stitches"] == stitches
    # the checkpoint exports the lowest-perplexity stitch within a budget, standalone: no anchor directory needed
    from snnet.cli import main
    from snnet.deploy.export import load_program, load_stitch
    from snnet.deploy.pretrained import load_trained
    from snnet.results import load_results, select_stitch

    budget = sorted(r["flops"] for r in stitches)[5] / 1e9
    chosen = select_stitch(load_results(first / "fit_results.json"), max_gflops=budget, metric="ppl")
    main(["export", "--ckpt", str(first / "checkpoints" / "step=6.ckpt"), "--results", str(first / "fit_results.json"),
          "--metric", "ppl", "--max-gflops", str(budget), "--out", str(tmp_path / "export")])
    net = load_trained(first / "checkpoints" / "step=6.ckpt").net.eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(ids, stitch=chosen.id)
    shutil.rmtree(tmp_path / "anchors")
    exported = load_stitch(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(exported(ids), expected)
        assert torch.equal(load_program(tmp_path / "export").module()(ids), expected)


def test_exported_stitches_of_a_tied_family_stand_alone_with_every_parameter_once(tmp_path) -> None:
    """Tied embeddings (the quickstart's): a stitched path holds the front anchor's embedding and the end
    anchor's tied output layer, an anchor path its one tied tensor; the export needs no model directory."""
    from snnet.deploy.export import export_stitch, load_program, load_stitch
    from snnet.sn_net.build import NetworkConfig, build_network

    dirs = save_family(tmp_path / "anchors", widths=(16, 32), depth=3)
    net = build_network(NetworkConfig(anchors=[{"name": d, "source": "transformers"} for d in dirs], input_size=[16])).eval()
    assert [net.infos[a].params for a in range(2)] == [m.num_parameters() for m in net.anchors]  # tied counted once
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    stitched = next(i for i in net.infos if not i.is_anchor and i.name.startswith(net.anchor_names[0] + "[0:1]"))
    for stitch in (0, 1, stitched.id):
        export_stitch(net, stitch, tmp_path / f"s{stitch}")
    shutil.rmtree(tmp_path / "anchors")
    for stitch in (0, 1, stitched.id):
        module = load_stitch(tmp_path / f"s{stitch}")
        assert sum(p.numel() for p in module.parameters()) == net.infos[stitch].params
        with torch.no_grad():
            expected = net(ids, stitch=stitch)
            assert torch.equal(module(ids), expected)
            assert torch.equal(load_program(tmp_path / f"s{stitch}").module()(ids[:1].repeat(5, 1)), expected[:1].repeat(5, 1, 1))
    # the stitched path: the front anchor's embedding (16 wide) and the end anchor's output layer (32 wide)
    front, end = net.anchors
    assert stitched.params > front.model.embed_tokens.weight.numel() + end.lm_head.weight.numel()


def test_quickstart_family_is_at_least_2x_apart_in_flops_per_token() -> None:
    from snnet.quickstart_lm import QUICKSTART_LM_SEQ_LEN, QUICKSTART_LM_WIDTHS, quickstart_lm_config

    anchors = [load_causal_lm(name, quickstart_lm_config(w)) for name, w in QUICKSTART_LM_WIDTHS.items()]
    net = StitchableNetwork(anchors, names=list(QUICKSTART_LM_WIDTHS), input_size=(QUICKSTART_LM_SEQ_LEN,))
    flops = [net.infos[a].flops for a in range(3)]
    assert flops[1] >= 2 * flops[0] and flops[2] >= 2 * flops[1]
    assert net.num_configs == 23


# --- the text datamodule ------------------------------------------------------------------------------
def test_text_datamodule_packs_next_token_pairs_and_splits_by_document(tmp_path) -> None:
    from snnet.text_data import TextDataModule

    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 40)
    dm = TextDataModule(paths=[str(tmp_path / "*.txt")], seq_len=16, val_fraction=0.2, batch_size=4)
    dm.setup()
    x, y = dm.train_set[0]
    assert x.dtype == torch.int64 and x.shape == (16,) and torch.equal(x[1:], y[:-1])
    again = TextDataModule(paths=[str(tmp_path / "*.txt")], seq_len=16, val_fraction=0.2, batch_size=4)
    again.setup()
    assert torch.equal(again.val_set.tokens, dm.val_set.tokens)  # deterministic split
    train_text, val_text = bytes(dm.train_set.tokens.tolist()).decode(), bytes(dm.val_set.tokens.tolist()).decode()
    held_out = {i for i in range(10) if f"document {i} " in val_text}
    assert len(held_out) == 2 and not any(f"document {i} " in train_text for i in held_out)
    xs, ys = dm.calibration_batch(3)
    assert xs.shape == ys.shape == (3, 16)


def test_text_datamodule_bad_inputs_name_the_value(tmp_path) -> None:
    from snnet.text_data import TextDataModule

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="training split of the text corpus .* has 0 tokens"):
        TextDataModule(paths=[str(tmp_path / "empty.txt")], seq_len=16).setup()
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        TextDataModule(paths=[str(tmp_path / "nothing_here/*.txt")], seq_len=16)
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        TextDataModule(corpus="wiki", seq_len=16)
    with pytest.raises(ValueError, match=r"seq_len 32 differs from the network's input_size \(16,\)"):
        TextDataModule(corpus="python_stdlib", max_bytes=1000, seq_len=32, data_config={"input_size": (16,), "vocab_size": 256})


def test_text_datamodule_with_a_transformers_tokenizer_from_a_directory(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from snnet.text_data import TextDataModule

    text = "def stitch(a, b):\n    return a + b\n" * 30
    for i in range(4):
        (tmp_path / f"doc{i}.py").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    vocab = len(PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"))
    dm = TextDataModule(paths=[str(tmp_path / "*.py")], tokenizer=str(tmp_path / "tok"), seq_len=8, val_fraction=0.25)
    dm.setup()
    eos = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok").eos_token_id
    assert int(dm.train_set.tokens.max()) < vocab and (dm.train_set.tokens == eos).sum() == 3  # one per training document
    with pytest.raises(ValueError, match=f"has {vocab} tokens but the anchors' vocabulary has {vocab - 1}"):
        TextDataModule(paths=[str(tmp_path / "*.py")], tokenizer=str(tmp_path / "tok"),
                       data_config={"input_size": (8,), "vocab_size": vocab - 1}).setup()


def test_latency_is_measured_on_token_ids_and_image_only_exports_say_so(tmp_path) -> None:
    from snnet.deploy.latency import measure_latency
    from snnet.deploy.onnx import export_onnx
    from snnet.deploy.pretrained import save_pretrained
    from snnet.sn_net.build import NetworkConfig

    net = three_anchor_family(depths=(2, 2, 2))
    ids = net.example_input(3)
    assert ids.dtype == torch.int64 and ids.shape == (3, 16) and int(ids.max()) < VOCAB
    latency = measure_latency(net, batch_size=2, warmup=0, repeats=1, progress=False)
    assert sorted(latency) == list(range(net.num_configs)) and all(ms > 0 for ms in latency.values())
    with pytest.raises(ValueError, match=r"ONNX export \(--format onnx\) is for image families so far"):
        export_onnx(net, [0], tmp_path / "onnx")
    with pytest.raises(ValueError, match=r"pretrained folder \(--format pretrained\) is for image families so far"):
        save_pretrained(net, NetworkConfig(anchors=[{"name": "s", "source": "transformers"}]), tmp_path / "folder")
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_relative_model_directory_missing_here_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"language model 'outputs/anchors/llama_s': no such directory \(from .*\) "
                       r"and no reachable hub model"):
        load_causal_lm("outputs/anchors/llama_s")
