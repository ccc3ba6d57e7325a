# Convert the CPU baseline to echo:2 and fine-tune it with distillation from itself, unconverted.
# First: python train.py config/train_shakespeare_char_cpu.py   (writes out-shakespeare-char-cpu)
# CE-only twin: --distill_alpha=0. Layer-wise instead of one-shot: --kv_share_target=echo:2 --adapt_iters=250
exec(open("config/train_shakespeare_char_cpu.py").read())
out_dir = "out-convert-shakespeare-char-cpu-echo"
init_from = "ckpt:out-shakespeare-char-cpu"
kv_share = "echo:2"               # layers 2 and 3 read layer 1's K/V
kv_init = "keep"
distill_alpha = 0.5               # 0.5 CE + 0.5 KL(teacher || student); the teacher is the model as loaded
distill_temperature = 1.0
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
max_iters = 1000
lr_decay_iters = 1000
eval_interval = 250
eval_iters = 60
