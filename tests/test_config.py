"""Run settings: CLI and YAML parsing (HfArgumentParser), validation, method defaults, YAML round trip."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from qlora_ga.config import (
    FORMATS,
    METHOD_DEFAULTS,
    METHODS,
    OPTIMS,
    FinetuneConfig,
    make_parser,
    method_defaults,
    parse_config,
    resolved,
    save_yaml,
)
from qlora_ga.errors import QloraGaError
from qlora_ga.methods import AUTO_LR_DEFAULT

REPO = Path(__file__).resolve().parents[1]
FIELDS = [f for f in dataclasses.fields(FinetuneConfig) if f.name != "config"]

# a valid value different from the default, for every field
NON_DEFAULT = {
    "model": "some/model",
    "dataset": "data/train.jsonl",
    "format": "alpaca",
    "prompt_column": "question",
    "response_column": "answer",
    "messages_column": "conv",
    "text_column": "body",
    "max_length": 1024,
    "overlong": "drop",
    "n_builtin": 123,
    "eval_split": "test",
    "rank": 16,
    "rank_allocation": "gradient",
    "alpha": 32.0,
    "init": "lora-one",
    "gamma": 64.0,
    "init_samples": 32,
    "init_micro_batch": 2,
    "target_modules": "q_proj,v_proj",
    "lora_dropout": 0.1,
    "batch_size": 2,
    "grad_accum": 8,
    "lr": 3e-4,
    "epochs": 2.5,
    "max_steps": 100,
    "warmup": 10.0,
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "optim": "adamw",
    "seed": 7,
    "no_gradient_checkpointing": True,
    "group_by_length": True,
    "padding_free": False,
    "packing": True,
    "compile": True,
    "fused_lora": True,
    "liger": True,
    "device": "cuda:1",
    "compute_dtype": "fp16",
    "eval_every": 50,
    "save_every": 25,
    "save_total_limit": 3,
    "log_every": 5,
    "report_to": "tensorboard",
    "sample_prompts": 3,
    "output_dir": "outputs/x",
    "resume": "outputs/x/checkpoint-10",
    "overwrite": True,
    "export_merged": True,
    "merged_dtype": "bf16",
    "export_gguf": "q8_0",
    "llama_cpp": "/opt/llama.cpp",
}


def _cli_value(v):
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_non_default_table_covers_every_field():
    assert set(NON_DEFAULT) == {f.name for f in FIELDS}
    for f in FIELDS:
        assert NON_DEFAULT[f.name] != f.default, f.name
        assert f.metadata.get("help"), f"{f.name} has no help"
    assert dataclasses.fields(FinetuneConfig)[-1].metadata.get("help")


def test_defaults():
    cfg = parse_config([])
    assert cfg == FinetuneConfig()
    assert cfg.init == "lora-ga" and cfg.rank == 8 and cfg.lr is None and cfg.alpha is None and cfg.gamma is None
    assert cfg.optim == "paged_adamw_32bit" and cfg.max_steps == -1 and cfg.output_dir == "outputs/run"
    from qlora_ga.arch import DEFAULT_TARGETS

    assert cfg.target_modules == DEFAULT_TARGETS == "all-linear"  # resolved per model by arch.resolve_targets


@pytest.mark.parametrize("name", [f.name for f in FIELDS])
def test_every_field_from_cli_and_yaml(tmp_path, name):
    value = NON_DEFAULT[name]
    expected = dataclasses.replace(FinetuneConfig(), **{name: value})
    # CLI, underscore and dash spellings
    assert parse_config([f"--{name}", _cli_value(value)]) == expected
    assert parse_config([f"--{name.replace('_', '-')}={_cli_value(value)}"]) == expected
    # YAML, underscore and dash keys
    for key in {name, name.replace("_", "-")}:
        path = _write(tmp_path, yaml.safe_dump({key: value}))
        assert parse_config(["--config", path]) == dataclasses.replace(expected, config=path)


def test_all_fields_at_once_cli_yaml_and_save_round_trip(tmp_path):
    expected = FinetuneConfig(**NON_DEFAULT)
    argv = [a for k, v in NON_DEFAULT.items() for a in (f"--{k}", _cli_value(v))]
    assert parse_config(argv) == expected
    path = _write(tmp_path, yaml.safe_dump(NON_DEFAULT))
    assert parse_config(["--config", path]) == dataclasses.replace(expected, config=path)
    saved = str(save_yaml(expected, tmp_path / "run" / "config.yaml"))
    assert parse_config(["--config", saved]) == dataclasses.replace(expected, config=saved)
    text = Path(saved).read_text()
    assert all(f"\n{f.name}:" in text for f in FIELDS)


@pytest.mark.parametrize("cfg", [FinetuneConfig(), resolved(FinetuneConfig(init="gaussian", eval_split="0.05"))])
def test_save_yaml_round_trip_defaults(tmp_path, cfg):
    saved = str(save_yaml(cfg, tmp_path / "config.yaml"))
    assert parse_config(["--config", saved]) == dataclasses.replace(cfg, config=saved)


def test_yaml_value_forms(tmp_path):
    # YAML 1.1 reads '5e-5' as a string and 16 as an int: both must become floats; a list of targets is accepted
    path = _write(tmp_path, "lr: 5e-5\nalpha: 16\neval_split: 0.05\ntarget_modules: [q_proj, v_proj]\nmodel: null\n")
    cfg = parse_config(["--config", path])
    assert cfg.lr == 5e-5 and isinstance(cfg.alpha, float) and cfg.alpha == 16.0
    assert cfg.eval_split == "0.05" and cfg.eval_fraction == 0.05 and cfg.eval_split_name is None
    assert cfg.target_modules_list == ["q_proj", "v_proj"] and cfg.model is None
    assert parse_config(["--config", _write(tmp_path, "")]).rank == 8  # empty file: all defaults


def test_cli_overrides_yaml(tmp_path):
    path = _write(tmp_path, "rank: 16\nlr: 1e-4\ninit: lora-one\nresume: some/ckpt\noverwrite: true\n")
    cfg = parse_config(["--rank", "4", "--config", path, "--resume", "--overwrite", "false"])
    assert cfg.rank == 4 and cfg.lr == 1e-4 and cfg.init == "lora-one"
    assert cfg.resume == "latest" and cfg.overwrite is False
    assert parse_config(["--config", path]).resume == "some/ckpt"


def test_resume_and_bool_flags():
    assert parse_config(["--resume"]).resume == "latest"
    assert parse_config(["--resume", "--rank", "4"]).resume == "latest"
    assert parse_config(["--resume", "ckpt/step-5"]).resume == "ckpt/step-5"
    cfg = parse_config(["--overwrite", "--export_merged", "--no_gradient_checkpointing"])
    assert cfg.overwrite and cfg.export_merged and cfg.no_gradient_checkpointing


@pytest.mark.parametrize(
    "argv",
    [
        ["--no_such_flag", "1"],
        ["--rnk", "4"],
        ["--epoch", "2"],  # no abbreviations
        ["stray"],
        ["--rank", "four"],
        ["--lr", "fast"],
        ["--init", "lora-xx"],
        ["--optim", "sgd"],
        ["--format", "csv"],
        ["--overlong", "cut"],
        ["--merged_dtype", "fp8"],
        ["--export_gguf", "q5_x"],
        ["--report_to", "mlflow"],
        ["--overwrite", "maybe"],
        ["--config", "/does/not/exist.yaml"],
    ],
)
def test_bad_cli_is_one_line_error(argv):
    with pytest.raises(QloraGaError) as e:
        parse_config(argv)
    assert "\n" not in str(e.value) and str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "no_such_key: 1\n",
        "rnak: 4\n",
        "rank: four\n",
        "rank: 8.5\n",
        "init: lora-xx\n",
        "optim: sgd\n",
        "format: csv\n",
        "overlong: cut\n",
        "merged_dtype: fp8\n",
        "export_gguf: q5_x\n",
        "report_to: mlflow\n",
        "overwrite: maybe\n",
        "rank: 0\n",
        "output_dir: null\n",
        "rank: [1, 2]\n",
        "config: other.yaml\n",
        "- rank\n- 8\n",
        "rank: 8\nrank-: 9\n",
        "rank: 8\nrank:: [\n",
        "init_samples: 8\ninit-samples: 4\n",
    ],
)
def test_bad_yaml_is_one_line_error(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(QloraGaError) as e:
        parse_config(["--config", path])
    assert "\n" not in str(e.value) and str(e.value)


def test_unknown_key_message_names_file_and_suggests(tmp_path):
    path = _write(tmp_path, "rnak: 4\n")
    with pytest.raises(QloraGaError, match=r"unknown key 'rnak' \(did you mean 'rank'\?\)") as e:
        parse_config(["--config", path])
    assert path in str(e.value)
    with pytest.raises(QloraGaError, match=r"did you mean 'rank'"):
        parse_config(["--rnk", "4"])


def test_invalid_choice_in_yaml_checked_by_validate_too():
    # configs built in code (not through argparse) are checked by validate()
    for name, bad in [("init", "nope"), ("optim", "sgd"), ("format", "csv"), ("overlong", "cut"), ("merged_dtype", "fp8"),
                      ("report_to", "mlflow"), ("export_gguf", "q5_x")]:
        with pytest.raises(QloraGaError, match=name) as e:
            FinetuneConfig(**{name: bad}).validate()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-4), "lr"),
        (dict(alpha=0.0), "alpha"),
        (dict(gamma=-1.0), "gamma"),
        (dict(max_length=7), "max_length"),
        (dict(batch_size=0), "batch_size"),
        (dict(grad_accum=0), "grad_accum"),
        (dict(epochs=0.0), "epochs"),
        (dict(epochs=-1.0, max_steps=-1), "epochs"),
        (dict(max_steps=-2), "max_steps"),
        (dict(init_samples=0), "init_samples"),
        (dict(init_micro_batch=0), "init_micro_batch"),
        (dict(eval_split="0"), "eval_split"),
        (dict(eval_split="1.5"), "eval_split"),
        (dict(eval_split="-0.1"), "eval_split"),
        (dict(eval_split=""), "eval_split"),
        (dict(eval_split="my split!"), "eval_split"),
        (dict(target_modules=" , "), "target_modules"),
        (dict(warmup=-0.1), "warmup"),
        (dict(warmup=2.5), "warmup"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(eval_every=-1), "eval_every"),
        (dict(save_every=-1), "save_every"),
        (dict(save_total_limit=0), "save_total_limit"),
        (dict(log_every=0), "log_every"),
        (dict(n_builtin=0), "n_builtin"),
        (dict(sample_prompts=-1), "sample_prompts"),
        (dict(device="gpu 0"), "device"),
        (dict(resume=""), "resume"),
    ],
)
def test_validation_errors(tmp_path, changes, match):
    with pytest.raises(QloraGaError, match=match) as e:
        FinetuneConfig(**changes).validate()
    msg = str(e.value)
    assert "\n" not in msg and ":" in msg  # what is wrong: what to do
    # the same mistake through the CLI and through YAML
    argv = [a for k, v in changes.items() for a in (f"--{k}={v}",)]
    with pytest.raises(QloraGaError, match=match):
        parse_config(argv)
    path = _write(tmp_path, yaml.safe_dump(changes))
    with pytest.raises(QloraGaError, match=match):
        parse_config(["--config", path])


def test_valid_edge_cases():
    FinetuneConfig(epochs=0.0, max_steps=0).validate()  # init only
    FinetuneConfig(epochs=0.0, max_steps=10).validate()
    FinetuneConfig(max_length=8, warmup=0.0, max_grad_norm=0.0, eval_split="0.05").validate()
    FinetuneConfig(eval_split="validation", device="cpu").validate()
    cfg = FinetuneConfig(eval_split="test")
    assert cfg.eval_split_name == "test" and cfg.eval_fraction is None
    assert FinetuneConfig(batch_size=2, grad_accum=8).effective_batch == 16
    assert FinetuneConfig(target_modules=" q_proj, v_proj ,").target_modules_list == ["q_proj", "v_proj"]


def test_the_steps_settings_come_from_the_run_settings_by_name():
    from qlora_ga.data import DataConfig
    from qlora_ga.train import TrainSettings

    cfg = resolved(FinetuneConfig(**NON_DEFAULT))
    # every step setting that FinetuneConfig has under the same name is taken from it; the rest are the known derived
    # ones or left at the step's own default (not options of finetune.py)
    for settings, derived, own in ((cfg.train_settings(), {"gradient_checkpointing": False}, {"precond_lambda", "num_workers"}),
                                   (cfg.data_config(), {"eval_split": "test"}, {"split", "max_examples", "use_chat_template"})):
        names = {f.name for f in dataclasses.fields(settings)}
        shared = names & {f.name for f in FIELDS}
        assert names == shared | set(derived) | own
        assert {n: getattr(settings, n) for n in shared - set(derived)} == {n: getattr(cfg, n) for n in shared - set(derived)}
        assert {n: getattr(settings, n) for n in derived} == derived
        default = type(settings)()
        assert all(getattr(settings, n) == getattr(default, n) for n in own)
    assert isinstance(cfg.train_settings(), TrainSettings) and isinstance(cfg.data_config(), DataConfig)
    assert FinetuneConfig(eval_split="0.05").data_config().eval_split == 0.05
    assert FinetuneConfig().train_settings().gradient_checkpointing is True
    with pytest.raises(TypeError):  # by name only: the fields follow FinetuneConfig's order, not a signature
        TrainSettings(8, 4)


def test_method_defaults_are_the_documented_ones():
    # the README and --help state every method's default lr: they must say what the table holds
    readme = " ".join((REPO / "README.md").read_text().split())
    stated = re.search(r"Per-method learning-rate defaults \(.*?\): (.*?) \(`--lr` overrides\)", readme).group(1)
    lrs = {m: lr if lr == "auto" else float(lr) for part in stated.split(", ") for names, lr in [part.rsplit(" ", 1)]
           for m in names.split("/")}
    assert lrs == {m: "auto" if m in AUTO_LR_DEFAULT else d["lr"] for m, d in METHOD_DEFAULTS.items()}
    assert AUTO_LR_DEFAULT and set(AUTO_LR_DEFAULT) <= set(METHODS)
    assert stated in next(f.metadata["help"] for f in FIELDS if f.name == "lr")  # what --help prints for --lr
    # the gradient inits (and only they) run the gradient pass and use rsLoRA scaling; vanilla LoRA has no gamma
    for m in METHODS:
        d, cfg = method_defaults(m), FinetuneConfig(init=m)
        assert cfg.is_gradient_init == (d["gamma"] is not None) == cfg.use_rslora == (m not in ("gaussian", "kaiming"))
    before = METHOD_DEFAULTS["lora-ga"]["lr"]
    method_defaults("lora-ga")["lr"] = before * 2  # a copy: the table is not changed
    assert METHOD_DEFAULTS["lora-ga"]["lr"] == before
    with pytest.raises(QloraGaError, match=r"did you mean 'lora-one'"):
        method_defaults("lora-onw")


@pytest.mark.parametrize("init", METHODS)
def test_resolved_fills_method_defaults(init):
    d = method_defaults(init)
    cfg = resolved(parse_config(["--init", init]))
    assert (cfg.lr, cfg.alpha, cfg.gamma) == ("auto" if init in AUTO_LR_DEFAULT else d["lr"], d["alpha"], d["gamma"])
    # an 'auto' default only with the optimizers the search follows; the fixed lr with lora-one-precond
    assert resolved(parse_config(["--init", init, "--optim", "lora-one-precond"])).lr == d["lr"]
    assert cfg.use_rslora == d["use_rslora"]
    assert cfg.is_gradient_init == (init not in ("gaussian", "kaiming"))
    # explicit values win
    cfg = resolved(parse_config(["--init", init, "--lr", "1e-2", "--alpha", "8", "--gamma", "4"]))
    assert (cfg.lr, cfg.alpha, cfg.gamma) == (1e-2, 8.0, 4.0)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = resolved(parse_config(["--config", str(path)]))
    cfg.validate()
    assert (cfg.lr == "auto" or cfg.lr > 0) and cfg.init in METHODS and cfg.optim in OPTIMS and cfg.format in FORMATS


def test_shipped_configs_content():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"default.yaml", "llama2-7b-24gb.yaml", "colab-t4.yaml", "smollm2-gsm8k.yaml"} <= names
    c = parse_config(["--config", str(REPO / "configs" / "llama2-7b-24gb.yaml")])
    assert (c.model, c.rank, c.init, c.max_length, c.batch_size, c.grad_accum, c.optim, c.init_samples) == (
        "meta-llama/Llama-2-7b-hf", 8, "lora-ga", 1024, 4, 8, "paged_adamw_32bit", 64)
    c = parse_config(["--config", str(REPO / "configs" / "colab-t4.yaml")])
    assert (c.batch_size, c.grad_accum, c.max_length, c.init_samples) == (1, 16, 512, 32)
    c = parse_config(["--config", str(REPO / "configs" / "smollm2-gsm8k.yaml")])
    assert c.model is None and c.dataset == "openai/gsm8k:main" and c.eval_fraction == 0.05
    assert parse_config(["--config", str(REPO / "configs" / "default.yaml")]).model is None


def test_prodigy_default_lr_and_rank_allocation_checks():
    assert resolved(parse_config(["--optim", "prodigy"])).lr == 1.0  # a multiplier of prodigy's own step size
    assert resolved(parse_config(["--optim", "prodigy", "--init", "gaussian"])).lr == 1.0
    assert resolved(parse_config(["--optim", "prodigy", "--lr", "0.5"])).lr == 0.5
    assert parse_config(["--rank-allocation", "gradient", "--init", "gaussian"]).rank_allocation == "gradient"
    for init in ("lora-ga-sign", "lora-ga-adam"):
        with pytest.raises(QloraGaError, match=f"rank_allocation gradient does not support init {init}"):
            parse_config(["--rank-allocation", "gradient", "--init", init])
    with pytest.raises(QloraGaError, match="rank_allocation"):
        parse_config(["--rank-allocation", "by-gradient"])


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        make_parser(prog="finetune.py").parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--init_samples" in out and "lora-one-precond" in out


def test_every_flag_the_readme_names_is_an_option_of_its_command():
    """The README's flags are real: finetune's are FinetuneConfig fields (so YAML keys and --help lines too), the
    others export's or evaluate's own options, or the launchers' and tools' the README quotes."""
    import re

    from qlora_ga.evaluate import build_parser as evaluate_parser
    from qlora_ga.export.cli import build_parser as export_parser

    options = {f"--{f.name}" for f in dataclasses.fields(FinetuneConfig)} | {"--help"}
    options |= {o.replace("_", "-") for o in options}
    for parser in (export_parser(), evaluate_parser()):
        options |= {s for a in parser._actions for s in a.option_strings}
    others = {"--no-deps", "--num_processes", "--nproc-per-node", "--multi_gpu", "--logdir", "--tiny"}
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", (REPO / "README.md").read_text()))
    assert named - options - others == set()
    assert others - named == set()  # (a stale exception is an error too)


def test_qlora_ga_subcommands_finetune_export_evaluate(capsys, tmp_path):
    from qlora_ga.cli import main

    for argv, usage, flag in ((["export", "--help"], "usage: qlora-ga export", "--merge-base"),
                              (["evaluate", "--help"], "usage: qlora-ga evaluate", "--no-generate"),
                              (["finetune", "--help"], "usage: ", "--init_samples"),
                              (["--help"], "usage: ", "qlora-ga export --help")):  # no subcommand: finetune
        with pytest.raises(SystemExit) as e:
            main(argv)
        out = " ".join(capsys.readouterr().out.split())  # (argparse wraps to the terminal's width)
        assert e.value.code == 0 and out.startswith(usage) and flag in out, argv
    assert main(["evaluate", "--data", str(tmp_path / "missing.jsonl")]) == 2  # each one's own one-line error
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["finetune", "--rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err


def test_lr_auto_from_the_command_line_and_yaml_and_back(tmp_path):
    cfg = resolved(parse_config(["--lr", "auto", "--init", "gaussian"]))
    assert cfg.lr == "auto"  # stays a word until the search after the init gives the number
    f = tmp_path / "c.yaml"
    f.write_text("lr: auto\ninit: lora-one\n")
    assert parse_config(["--config", str(f)]).lr == "auto"
    assert parse_config(["--config", str(f), "--lr", "3e-4"]).lr == 3e-4  # the command line wins, as a number
    save_yaml(parse_config(["--lr", "auto"]), tmp_path / "saved.yaml")
    assert parse_config(["--config", str(tmp_path / "saved.yaml")]).lr == "auto"
    f.write_text("lr: 2.0e-4\n")
    cfg = parse_config(["--config", str(f)])
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    save_yaml(cfg, tmp_path / "saved.yaml")
    assert "lr: 0.0002\n" in (tmp_path / "saved.yaml").read_text()  # a number in the YAML, not a quoted string
    with pytest.raises(QloraGaError, match="lr auto searches along Adam's first step, not lora-one-precond's"):
        parse_config(["--lr", "auto", "--optim", "lora-one-precond"])
    with pytest.raises(QloraGaError, match=r"lr must be a number > 0 or 'auto', got Auto"):
        parse_config(["--lr", "Auto"])
