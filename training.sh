#!/usr/bin/env bash
# Step 2: fine-tune a base RWKV model on your tokenized data.
# Edit the variables below, then run ./training.sh   (./training.sh --dry-run checks everything first
# and shows two training samples with the loss mask, without training).
# Every value is checked before anything is loaded; a mistake gets a one-line message with the fix.
# ./training.sh --config output/NAME.env: a config saved by the web page (./webui.sh) replaces these values.
set -a   # every variable below is handed to the trainer

# ---------------------------------------------------------------- paths
MODEL="demo.pth"          # base model: a .pth file in model/ (RWKV-5, 6 or 7; sizes are read from the file)
DATA="sample"             # data: the name make_tokenize.sh printed (data/NAME.bin + data/NAME.idx)
OUTPUT="output"           # where checkpoints, loss.csv, loss.png and samples.txt go
INIT_ADAPTER=""           # start a new run from trained tensors: output/rwkv-N.pth, merge/*-state-N.pth, an RWKV-PEFT file | empty: fresh
PISSA_INIT=""             # only for an RWKV-PEFT PiSSA INIT_ADAPTER: the init_pissa.pth that run wrote beside it

# ---------------------------------------------------------------- method
FINETUNE_MODE="lora"      # lora | dora | pissa | bone | miss | bat | state | full. Beginners: lora. dora = LoRA + a learned
                          #   size per output row. miss = bone (its new name). state = tiny file, mountable in RWKV-Runner
LORA_R=64                 # lora / dora: rank. 8-64 usual; higher = more capacity, more memory
LORA_ALPHA=128            # lora / dora: the update is scaled by LORA_ALPHA/LORA_R; 2×LORA_R is a good start
LORA_DROPOUT=0            # lora / dora: 0 is fine; 0.05 can help with very small data
LORA_SCALING="standard"   # lora / dora: standard = LORA_ALPHA/LORA_R | rslora = LORA_ALPHA/sqrt(LORA_R) (steadier at high ranks)
PISSA_R=64                # pissa: rank
SVD_NITER=4               # pissa: power iterations of the fast SVD at start-up; 4 is plenty
DISHA_R=64                # bone / miss / bat: block size; must divide the model width (64 works for every released size)
TRAIN_PARTS=""            # also train: any of "emb head time ln deepembed"; empty = only the method (time = the time-mix vectors and matrices; deepembed = RWKV-7a's DeepEmbed tensors)

# ---------------------------------------------------------------- data
CTX_LEN=512               # tokens per sample: make_tokenize.sh suggests one; state tuning likes it short (512)
DATALOAD="pad"            # pad: each item from its start, padded (any MICRO_BSZ) | only: one item per step | get: random windows
LOSS_MASK="pad"           # pad: ignore padding | qa: train only on the Assistant's answers | none
VALID_DATA=""             # validation data, never trained on: a name in data/, e.g. "sample.valid" (make_tokenize.sh
                          #   FILE --valid 0.05 writes it); its loss goes to loss.csv, loss.png and the log | empty: none
VALID_FRACTION=0          # or hold this share of DATA's items out for validation, e.g. 0.05 (chosen by SEED) | 0: none
VALID_EVERY=0             # validate every N optimizer steps (and after the last) | 0: at every save. The best is kept
                          #   as OUTPUT/rwkv-best.pth (./merge.sh best)
EARLY_STOP=0              # stop after N validations in a row without a better loss (saved as on Ctrl+C) | 0: never

# ---------------------------------------------------------------- schedule
MICRO_BSZ=1               # samples per step per GPU: raise it while memory allows (see make_tokenize's table)
MINI_BSZ=1                # gradient accumulation: micro-batches added up per optimizer step (1 = off)
EPOCH_COUNT=1             # epochs to train
EPOCH_STEPS=88            # steps per epoch: items / MICRO_BSZ covers every item once (make_tokenize's table; 88 fits the demo's sample)
EPOCH_SAVE=1              # save a checkpoint every N epochs (the last epoch is always saved)
LR_INIT=1e-4              # learning rate: lora/dora/pissa/bone 1e-4 to 2e-5; full 1e-5; state tuning 1 (yes, one)
LR_FINAL=1e-5             # learning rate at the end; state tuning 0.01
WARMUP_STEPS=0            # optimizer steps of warm-up; state tuning: 10
LR_SCHEDULE="cos"         # cos: smooth decay | wsd: flat, then decay over the last 20% | const
WEIGHT_DECAY=0            # AdamW's weight decay, on the trained matrices only (not norms, time-mix, states) | 0: off
BETA1=0.9                 # AdamW's beta1 (0 to below 1): how slowly its mean of the gradients moves
BETA2=0.99                # AdamW's beta2 (0 to below 1): the same for its mean of the squared gradients
ADAM_EPS=1e-8             # AdamW's eps (more than 0), added to the root of that second mean
L2WRAP=1                  # 1: RWKV-LM's L2Wrap, a tiny extra gradient on each position's largest logit that keeps
                          #   the logits from drifting up (the loss is unchanged) | 0: off

# ---------------------------------------------------------------- long context
TRAIN_TYPE="normal"       # normal | infctx: texts longer than memory allows, fed in chunks with the exact gradient
CHUNK_CTX=512             # infctx: tokens per chunk; memory depends on this, not on CTX_LEN (512-2048 usual)
INITIAL_CTX_LEN=0         # ctx warm-up: start training at this length and grow to CTX_LEN (0 = off)
CTX_WARMUP_STEPS=0        # ctx warm-up: optimizer steps to grow from INITIAL_CTX_LEN to CTX_LEN

# ---------------------------------------------------------------- hardware
ACCELERATOR="auto"        # auto: the GPU if there is one | cuda | cpu
PRECISION="auto"          # auto: bf16 on a GPU that has it (RTX 30xx, A100 and newer), fp16 on older GPUs, fp32 on
                          #   the CPU (bf16 ran 20x slower on a CPU without AMX / AVX-512 BF16) | bf16 | fp16 | fp32
OP="auto"                 # WKV kernel: auto picks the fastest that works | triton (ours, RWKV-7) | fla | chunk | torch (slow reference)
GRAD_CP="auto"            # gradient checkpointing: auto = only as much as needed to fit this GPU (fastest that fits)
                          #   | 1 = every block: least memory, ~30% slower | 0 = none: fastest, most memory
COMPILE="auto"            # torch.compile the model's blocks: faster steps after ~1 min of compiling | auto = on a GPU | 1 | 0 = off
QUANT="none"              # none | int8 | nf4 | fp8: frozen base weights stored in 8 / 4 / 8 bits (QLoRA; NVIDIA GPU, not
                          #   with full; fp8: GPUs with fp8 tensor cores, RTX 40xx / H100 and newer, multiply in fp8)
OPTIMIZER="adamw"         # adamw | adamw8bit: AdamW's two states in 8 bits (bitsandbytes; NVIDIA GPU, not with
                          #   DeepSpeed): 6 bytes less per trained number (LoRA 1.5B: 0.3 GB), slightly rounded
                          #   updates; slower where steps are short (1.5B LoRA at ctx 1024 x 1: -24 %; 4096 x 8: -3 %)
OFFLOAD_BLOCKS="auto"     # blocks whose frozen weights wait in CPU memory and are copied to the GPU as they run, for
                          #   a model that would not fit otherwise: auto = only then, as few as fit | 0 = never | N
                          #   (lora, dora, pissa, bone, bat, state; one GPU; not with QUANT, GRAD_CP=0 or DeepSpeed;
                          #   they must fit in the CPU memory available: checked before loading)
STRATEGY="auto"           # auto (one GPU, or DDP on several) | deepspeed_stage_1 | _2 | _2_offload | _3 | _3_offload
                          #   (DeepSpeed ZeRO: splits optimizer state (1), + gradients (2), + weights (3) over
                          #   GPUs; _offload keeps them in CPU memory, not on WSL2; pip install deepspeed)
GPU_COUNT=1               # GPUs per machine: each trains MICRO_BSZ samples per step
NODES=1                   # machines: each started with NODE_RANK and MASTER_ADDR (README, Several machines)
SEED=42                   # random seed: same seed + same settings = same run
WANDB=""                  # a wandb project name to log there too; empty = off (loss.csv and loss.png are always written)
RESUME=0                  # 1 = continue the run saved in OUTPUT (optimizer, position and schedule included)
OVERWRITE=0               # 1 = a new run (RESUME=0) may replace an earlier run's files in OUTPUT; 0 refuses to

set +a
cd "$(dirname "$0")" && exec python3 -m tools.train "$@"
