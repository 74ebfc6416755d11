"""Deploying a stitch: latency measurement (`snnet bench latency`), choosing a stitch by id or budget
(Python API, `snnet select`, SNNetModule predict), on tiny CIFAR ResNets and the digits."""
import json
import random
import time

import lightning as L
import pytest
import torch
import yaml

from helpers import tiny_data, tiny_module
from snnet.sn_net.choice import StitchChoice
from snnet.cli import main
from snnet.deploy.evaluate import evaluate_stitches
from snnet.front import front_figures
from snnet.deploy.latency import measure_latency, median_ms, resolve_device, with_latency
from snnet.results import StitchResult, load_figures, load_results, pareto_front, save_results, select_stitch


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny module, its digits data, and every stitch's measured accuracy written to a results file."""
    module = tiny_module(teacher=None).eval()
    data = tiny_data(module)
    results = evaluate_stitches(module.net, data.val_dataloader(), progress=False).results
    path = tmp_path_factory.mktemp("results") / "val_results.json"
    save_results(results, path)
    return module, data, results, path


def test_median_ms_is_the_median_of_synchronised_calls():
    durations = iter([0.001, 0.001, 0.030] * 2)
    assert 1.0 <= median_ms(lambda x: time.sleep(next(durations)), torch.zeros(1), warmup=0, repeats=3) < 20.0  # not the mean (10.7)
    with pytest.raises(ValueError, match="repeats >= 1"):
        median_ms(lambda x: x, torch.zeros(1), repeats=0)


def test_measure_latency_times_every_requested_stitch(scored):
    module, _, results, _ = scored
    latency = measure_latency(module.net, [3, 0], batch_size=2, warmup=1, repeats=3, progress=False)
    assert list(latency) == [3, 0] and all(ms > 0 for ms in latency.values())
    filled = with_latency(results[:1], latency)
    assert filled[0].latency_ms == latency[0] and filled[0].acc1 == results[0].acc1
    with pytest.raises(ValueError, match=r"no latency measured for stitch ids \[1\]"):
        with_latency(results[:2], latency)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        measure_latency(module.net, [0], batch_size=0)


def test_bad_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_select_returns_a_point_of_the_pareto_front_for_each_cost():
    rng = random.Random(1)
    results = [StitchResult(i, f"s{i}", rng.randint(1, 10**4) * 10**6, rng.randint(1, 10**4), False,
                            acc1=rng.uniform(40, 90), latency_ms=rng.uniform(1, 50)) for i in range(60)]
    for cost, budget_key, scale in (("flops", "max_gflops", 1e-9), ("params", "max_params", 1), ("latency_ms", "max_latency_ms", 1)):
        front = {r.id for r in pareto_front(results, cost=cost)}
        for r in results[::6]:
            chosen = select_stitch(results, **{budget_key: getattr(r, cost) * scale})
            assert chosen.id in front and chosen.acc1 >= r.acc1


def test_choice_by_id_budget_or_nothing(scored):
    module, _, results, path = scored
    net = module.net
    assert StitchChoice(stitch=2).resolve(net) == 2
    budget = sorted(r.gflops for r in results)[1]
    assert StitchChoice(max_gflops=budget, results=str(path)).resolve(net) == select_stitch(results, max_gflops=budget).id
    net.set_stitch(3)
    assert StitchChoice().resolve(net) == 3
    net.set_stitch(0)
    with pytest.raises(ValueError, match=r"give a stitch id \(1\) or a budget, not both"):
        StitchChoice(stitch=1, max_gflops=budget).resolve(net)
    with pytest.raises(ValueError, match="a budget needs measured accuracies"):
        StitchChoice(max_gflops=budget).resolve(net)
    with pytest.raises(IndexError, match="valid ids are 0..3"):
        StitchChoice(stitch=7).resolve(net)
    foreign = [StitchResult(r.id, f"other{r.id}", r.flops, r.params, r.is_anchor, r.acc1) for r in results]
    with pytest.raises(ValueError, match="measured on another network"):
        StitchChoice(max_gflops=budget).resolve(net, foreign)


def test_predict_runs_the_chosen_stitch(scored):
    module, data, results, path = scored
    x = next(iter(data.val_dataloader()))[0]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_predict_batches=1)
    budget = sorted(r.gflops for r in results)[2]
    expected_budget = select_stitch(results, max_gflops=budget).id
    for choice, expected in ((StitchChoice(stitch=3), 3), (StitchChoice(max_gflops=budget, results=str(path)), expected_budget)):
        module.predict_choice = choice
        (probs,) = trainer.predict(module, data.val_dataloader())
        assert module.net.stitch_id == expected
        with torch.no_grad():
            torch.testing.assert_close(probs, module.net(x, expected).softmax(-1))
    module.predict_choice = StitchChoice()
    module.net.set_stitch(0)


def test_cli_predict_takes_the_stitch_with_a_checkpoint(tmp_path):
    """`snnet predict --ckpt_path` rebuilds the module from the checkpoint; the stitch comes from the command line."""
    from snnet.trainer_cli import build_cli

    module = tiny_module(teacher=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, tiny_data(module))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    network = {"anchors": ["cifar_resnet8", "cifar_resnet14"], "pretrained": False, "input_size": [3, 16, 16]}
    config = {"model": {"class_path": "snnet.sn_net.module.SNNetModule", "init_args": {"network": network}},
              "data": {"class_path": "snnet.data.DigitsDataModule", "init_args": {"val_limit": 8, "num_workers": 0}},
              "trainer": {"logger": False, "enable_progress_bar": False, "accelerator": "cpu", "default_root_dir": str(tmp_path)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["predict", "--config", str(tmp_path / "c.yaml"), "--ckpt_path", str(tmp_path / "last.ckpt"),
                     "--model.init_args.predict.stitch", "2"])
    assert cli.model.predict_choice == StitchChoice(stitch=2)
    assert cli.model.net.stitch_id == 2  # set when predict started
    for (name, a), b in zip(module.net.state_dict().items(), cli.model.net.state_dict().values()):
        assert torch.equal(a, b), name  # the checkpoint's weights, not a fresh network


def test_bench_latency_cli_fills_a_results_file_for_select(scored, tmp_path, capsys):
    module, _, results, path = scored
    network = {"anchors": ["cifar_resnet8", "cifar_resnet14"], "pretrained": False, "input_size": [3, 16, 16]}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump({"model": {"class_path": "snnet.sn_net.module.SNNetModule", "init_args": {"network": network}}}))
    scored_file, figures = tmp_path / "validate_results.json", front_figures(results).to_dict()
    save_results(results, scored_file, figures=figures)  # as `snnet validate` writes it
    out = tmp_path / "with_latency.json"
    main(["bench", "latency", "--results", str(scored_file), "--config", str(tmp_path / "fit.yaml"), "--warmup", "0", "--repeats", "2", "--out", str(out)])
    timed = load_results(out)
    assert [(r.id, r.acc1) for r in timed] == [(r.id, r.acc1) for r in results]
    assert all(r.latency_ms > 0 for r in timed) and load_results(scored_file)[0].latency_ms is None  # --out leaves the input alone
    assert load_figures(out) == figures  # the front figures survive the rewrite
    budget = sorted(r.latency_ms for r in timed)[2]
    capsys.readouterr()
    main(["select", "--results", str(out), "--max-latency-ms", str(budget)])
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["id"] == max((r for r in timed if r.latency_ms <= budget), key=lambda r: (r.acc1, -r.flops)).id


@pytest.mark.parametrize("args, message", [
    (["bench", "speed"], "unknown measurement 'speed'; choose one of: latency"),
    (["bench", "latency", "--results", "{results}", "--config", "{config}", "--device", "gpu"], "unknown device 'gpu'"),
    (["bench", "latency", "--results", "{foreign}", "--config", "{config}"], "measured on another network"),
])
def test_bench_bad_input_is_a_clear_error(scored, tmp_path, capsys, args, message):
    _, _, results, path = scored
    network = {"anchors": ["cifar_resnet8", "cifar_resnet14"], "pretrained": False, "input_size": [3, 16, 16]}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump({"network": network}))
    save_results([StitchResult(r.id, f"x{r.id}", r.flops, r.params, r.is_anchor) for r in results], tmp_path / "foreign.json")
    paths = {"results": str(path), "config": str(tmp_path / "fit.yaml"), "foreign": str(tmp_path / "foreign.json")}
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**paths) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
