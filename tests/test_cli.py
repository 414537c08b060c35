"""The command line: bad input gives one clear line and exit code 2; flags override YAML."""

from __future__ import annotations

import pytest

from sib.cli import build_parser, main
from sib.config import TrainConfig, build_config


def test_flags_override_yaml_override_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 7\nlr: 0.5\ndataset_options: {rho: 0.5}\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--lr", "0.1"])
    cfg = build_config(TrainConfig, args, args.config)
    assert cfg.epochs == 7 and cfg.lr == 0.1 and cfg.dataset_options == {"rho": 0.5}
    assert cfg.batch_size == TrainConfig().batch_size


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "run.yaml").write_text("epoch: 7\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['epoch'\]"):
        build_config(TrainConfig, None, tmp_path / "run.yaml")


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet19"], "unknown model 'resnet19'; valid names:"),
    (["train", "--regularizer", "ib"],
     "unknown regularizer 'ib'; valid names: energy, hint, l1, none, rrr, rrr_star, sib"),
    (["train", "--dataset", "cifar"], "unknown dataset 'cifar'; valid names:"),
    (["train", "--config", "missing.yaml"], "--config missing.yaml: no such file"),
    (["evaluate", "--checkpoint", "nowhere"], "checkpoint nowhere: no such file"),
    (["evaluate"], "--checkpoint is required"),
    (["train", "--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["evaluate", "--checkpoint", ".", "--weights", "median"], "--weights 'median': valid values are best, last"),
    (["evaluate", "--checkpoint", "."], "checkpoint .: not a run folder (no best.pt)"),
])
def test_bad_input_one_clear_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--device", "cpu"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_data_check_on_a_missing_root_fails_clearly(tmp_path, capsys):
    code = main(["data", "check", "--dataset", "oxford_pets", "--root", str(tmp_path / "nope")])
    captured = capsys.readouterr()  # read once: a second call returns only what was printed since the first
    assert code == 2 and "nope" in captured.out and "Traceback" not in captured.out + captured.err
