"""Every config rule fires with a one-line message naming the variable; good values pass."""
import pytest

from trainer.config import TrainConfig
from trainer.data.binidx import write_binidx
from trainer.errors import UserError

BASE = {"MODEL": "m.pth", "DATA": "d"}


def cfg(**kw):
    return TrainConfig.from_env({**BASE, **{k: str(v) for k, v in kw.items()}})


def err(**kw) -> str:
    with pytest.raises(UserError) as e:
        cfg(**kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_types():
    c = cfg(TRAIN_PARTS="time, ln", GRAD_CP="0", LR_INIT="3e-4", WANDB="")
    assert c.TRAIN_PARTS == ("time", "ln") and c.GRAD_CP == "0" and c.LR_INIT == 3e-4 and c.WANDB == ""
    assert not c.checkpointing
    assert c.FINETUNE_MODE == "lora" and c.CTX_LEN == 512
    assert TrainConfig.from_env({**BASE, "CTX_LEN": ""}).CTX_LEN == 512   # empty number keeps the default
    env = c.to_env()
    assert TrainConfig.from_env(env) == c                                  # round trip through the variables


@pytest.mark.parametrize("kw, words", [
    ({"FINETUNE_MODE": "lorra"}, "FINETUNE_MODE"),
    ({"DATALOAD": "all"}, "DATALOAD"),
    ({"LOSS_MASK": "qaa"}, "LOSS_MASK"),
    ({"LR_SCHEDULE": "linear"}, "LR_SCHEDULE"),
    ({"PRECISION": "fp8"}, "PRECISION"),
    ({"TRAIN_PARTS": "time lnx"}, "TRAIN_PARTS"),
    ({"LORA_R": "0"}, "LORA_R"),
    ({"LORA_R": "eight"}, "LORA_R"),
    ({"CTX_LEN": "-5"}, "CTX_LEN"),
    ({"MICRO_BSZ": "0"}, "MICRO_BSZ"),
    ({"LORA_DROPOUT": "1.5"}, "LORA_DROPOUT"),
    ({"LORA_ALPHA": "0"}, "LORA_ALPHA"),
    ({"LR_INIT": "0"}, "LR_INIT"),
    ({"LR_INIT": "1e-5", "LR_FINAL": "1e-4"}, "LR_FINAL"),
    ({"DATALOAD": "only", "MICRO_BSZ": "2"}, "MICRO_BSZ"),
    ({"GRAD_CP": "maybe"}, "GRAD_CP"),
    ({"MODEL": ""}, "MODEL"),
    ({"DATA": ""}, "DATA"),
    ({"ACCELERATOR": "tpu"}, "ACCELERATOR"),
    ({"WEIGHT_DECAY": "-0.01"}, "WEIGHT_DECAY"),
    ({"WEIGHT_DECAY": "nan"}, "WEIGHT_DECAY"),
    ({"WEIGHT_DECAY": "inf"}, "WEIGHT_DECAY"),
    ({"WEIGHT_DECAY": "a little"}, "WEIGHT_DECAY"),
    ({"BETA1": "1"}, "BETA1"),
    ({"BETA1": "-0.1"}, "BETA1"),
    ({"BETA2": "1.5"}, "BETA2"),
    ({"BETA2": "nan"}, "BETA2"),
    ({"ADAM_EPS": "0"}, "ADAM_EPS"),
    ({"ADAM_EPS": "-1e-8"}, "ADAM_EPS"),
    ({"ADAM_EPS": "inf"}, "ADAM_EPS"),
    ({"L2WRAP": "2"}, "L2WRAP"),
    ({"INIT_ADAPTER": "output/rwkv-0.pth", "RESUME": "1"}, "RESUME=1 and INIT_ADAPTER"),
    ({"PISSA_INIT": "run/init_pissa.pth"}, "PISSA_INIT"),
    ({"PISSA_INIT": "run/init_pissa.pth", "INIT_ADAPTER": "run/rwkv-0.pth"}, "FINETUNE_MODE=pissa"),
    ({"INIT_ADAPTER": "x" * 300}, "INIT_ADAPTER"),
    ({"LORA_SCALING": "rs"}, "LORA_SCALING"),
])
def test_each_rule_fires(kw, words):
    assert words in err(**kw)


def test_optimizer_defaults_are_the_constants_they_replace():
    """AdamW's settings default to the values the trainer used before they existed (nothing changes for
    a run that does not set them); L2WRAP is on, as in the official trainers; all of them may change on
    RESUME=1 (the optimizer's running means stay valid)."""
    from trainer.config import RESUME_MAY_CHANGE
    from trainer.strategy import ADAM_BETAS, ADAM_EPS
    c = cfg()
    assert (c.BETA1, c.BETA2) == ADAM_BETAS and c.ADAM_EPS == ADAM_EPS and c.WEIGHT_DECAY == 0.0
    assert c.L2WRAP is True and cfg(L2WRAP=0).L2WRAP is False
    good = cfg(WEIGHT_DECAY="0.1", BETA1="0", BETA2="0.999", ADAM_EPS="1e-6")
    assert (good.WEIGHT_DECAY, good.BETA1, good.BETA2, good.ADAM_EPS) == (0.1, 0.0, 0.999, 1e-6)
    for name in ("WEIGHT_DECAY", "BETA1", "BETA2", "ADAM_EPS", "L2WRAP"):
        assert name in RESUME_MAY_CHANGE
    assert "Fix:" in err(BETA2="1") and "BETA2=0.99" in err(BETA2="1")


@pytest.mark.parametrize("raw, mode", [("1", "1"), ("0", "0"), ("auto", "auto"), ("AUTO", "auto"), ("yes", "1"),
                                       ("false", "0"), (True, "1"), (False, "0"), (1, "1")])
def test_grad_cp_values(raw, mode):
    """GRAD_CP: 0, 1 or auto; the boolean spellings training.sh files and tests used before still mean 0/1."""
    c = cfg(GRAD_CP=raw) if isinstance(raw, str) else TrainConfig.from_env(BASE, GRAD_CP=raw)
    assert c.GRAD_CP == mode and c.checkpointing == (mode != "0")


def test_options_not_built_yet_are_refused_not_ignored():
    from trainer.config import NOT_YET_AVAILABLE
    for name, bad in (("TRAIN_TYPE", "infctx"), ("QUANT", "nf4"), ("STRATEGY", "deepspeed_stage_2")):
        if name in NOT_YET_AVAILABLE:
            assert name in err(**{name: bad})


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "model" / "real.pth").write_bytes(b"x")
    write_binidx(tmp_path / "data" / "chat", [[5, 6, 7, 0]] * 10)       # 10 items, 40 tokens
    return tmp_path


def test_missing_model_lists_what_exists(project):
    c = TrainConfig.from_env({"MODEL": "rwkv7-1.5b", "DATA": "chat"})
    with pytest.raises(UserError, match=r"model/rwkv7-1.5b.pth not found.*real.pth"):
        c.check_files()


def test_missing_data_lists_what_exists(project):
    c = TrainConfig.from_env({"MODEL": "real.pth", "DATA": "chta"})
    with pytest.raises(UserError, match=r"DATA: data/chta.*not found.*chat"):
        c.check_files()


def test_data_names_are_forgiving(project):
    for name in ("chat", "chat.bin", "data/chat", "chat.jsonl"):
        TrainConfig.from_env({"MODEL": "real", "DATA": name, "EPOCH_STEPS": "10"}).check_files()


def test_epoch_larger_than_data(project):
    c = TrainConfig.from_env({"MODEL": "real.pth", "DATA": "chat", "EPOCH_STEPS": "6", "MICRO_BSZ": "2"})
    with pytest.raises(UserError, match=r"EPOCH_STEPS × MICRO_BSZ = 12 is more than the 10 items.*at most 5"):
        c.check_files()


def test_get_needs_enough_tokens(project):
    c = TrainConfig.from_env({"MODEL": "real.pth", "DATA": "chat", "DATALOAD": "get", "CTX_LEN": "64"})
    with pytest.raises(UserError, match=r"needs at least CTX_LEN\+1 = 65 tokens.*has 40"):
        c.check_files()
    TrainConfig.from_env({"MODEL": "real.pth", "DATA": "chat", "DATALOAD": "get", "CTX_LEN": "39"}).check_files()


def test_quant_rules():
    assert "full" in err(QUANT="nf4", FINETUNE_MODE="full")
    cfg(QUANT="nf4", FINETUNE_MODE="lora")            # the device is checked when training starts


def test_quant_on_a_machine_without_gpu_is_refused_before_loading(project, monkeypatch):
    import torch

    from trainer.loop import prepare
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    c = TrainConfig.from_env({"MODEL": "real.pth", "DATA": "chat", "EPOCH_STEPS": "5", "QUANT": "int8",
                              "PRECISION": "fp32"})
    with pytest.raises(UserError, match="NVIDIA GPU"):
        prepare(c)      # real.pth is not even a model: the refusal comes before loading it


def test_precision_defaults_to_auto_in_the_config_training_sh_and_the_web_form():
    from trainer.config import PRECISIONS
    from trainer.envfile import training_fields
    assert PRECISIONS[0] == "auto" and TrainConfig.PRECISION == "auto"
    field = next(f for f in training_fields() if f.name == "PRECISION")     # what the web page's form shows
    assert field.default == "auto" and "fp32 on" in field.help and "the CPU" in field.help
    for p in PRECISIONS:
        assert TrainConfig.from_env({"MODEL": "m", "DATA": "d", "PRECISION": p}).PRECISION == p


@pytest.mark.parametrize("mode", ["pissa", "bone", "miss", "bat", "state", "full"])
def test_rslora_only_with_a_method_scaled_by_alpha(mode):
    """LORA_SCALING=rslora changes LORA_ALPHA's scaling: refused in one line for a method without it (PiSSA has
    no alpha), taken for lora and dora; standard (the default) goes with every method."""
    msg = err(FINETUNE_MODE=mode, LORA_SCALING="rslora")
    assert msg.startswith(f"LORA_SCALING=rslora changes the LORA_ALPHA scaling of the update, which "
                          f"FINETUNE_MODE={mode} does not have (only lora or dora scale by alpha).")
    assert "Fix: set LORA_SCALING=standard, or FINETUNE_MODE to lora or dora" in msg
    assert cfg(FINETUNE_MODE=mode).LORA_SCALING == "standard"
    for good in ("lora", "dora"):
        c = cfg(FINETUNE_MODE=good, LORA_SCALING="rslora")
        assert c.LORA_SCALING == "rslora" and TrainConfig.from_env(c.to_env()) == c


def test_dora_and_miss_are_methods_and_their_settings_reach_the_method():
    from trainer.peft import get_method
    c = cfg(FINETUNE_MODE="dora", LORA_R=16, LORA_ALPHA=32, LORA_SCALING="rslora")
    cls = get_method(c.FINETUNE_MODE)
    assert cls(cls.settings_from(c)).metadata() == {"r": 16, "alpha": 32.0, "dropout": 0.0, "scaling": "rslora"}
    c = cfg(FINETUNE_MODE="miss", DISHA_R=32)
    assert c.FINETUNE_MODE == "miss" and get_method("miss").settings_from(c) == {"r": 32}
    assert "miss" in TrainConfig.__dataclass_fields__["FINETUNE_MODE"].metadata["help"]
    from trainer.envfile import training_fields
    field = next(f for f in training_fields() if f.name == "LORA_SCALING")     # training.sh's line, the web form
    assert field.default == "standard" and "rslora" in field.help and field.section == "method"
