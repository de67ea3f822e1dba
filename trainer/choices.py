"""Every list of choices a setting takes, defined once. The config validates against these; the modules that
implement a choice (peft, data, quant, strategy) import their list from here, so that adding a choice is one
line here and its code there."""

METHODS = ("lora", "dora", "pissa", "bone", "miss", "bat", "state", "full")  # FINETUNE_MODE (trainer/peft);
                                                                  # miss: Bone's current name (RWKV-PEFT's MiSS)
LORA_SCALINGS = ("standard", "rslora")                            # LORA_SCALING (peft/lora.py lora_scale)
PARTS = ("emb", "head", "time", "ln", "deepembed")                # TRAIN_PARTS (peft.base.part_names)
DATALOADS = ("get", "pad", "only")                                # DATALOAD (data/dataset.py)
LOSS_MASKS = ("none", "pad", "qa")                                # LOSS_MASK (data/masks.py)
SCHEDULES = ("cos", "wsd", "const")                               # LR_SCHEDULE (schedule.py)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")                     # PRECISION (plan.precision_name)
TRAIN_TYPES = ("normal", "infctx")                                # TRAIN_TYPE (infctx.py)
QUANT_TYPES = ("int8", "nf4", "fp8")                              # QUANT but none (quant.py)
QUANTS = ("none",) + QUANT_TYPES
OPTIMIZERS = ("adamw", "adamw8bit")                               # OPTIMIZER (strategy.py)
COMPILES = ("auto", "1", "0")                                     # COMPILE (plan.compile_choice)
GRAD_CPS = ("auto", "1", "0")                                     # GRAD_CP (plan.resolve)
STRATEGIES = ("auto", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")  # STRATEGY (strategy.py)
