# Character-level Tiny Shakespeare on a laptop CPU: nanoGPT's documented CPU shape
# (4 layers, 128 wide, 4 heads, context 64, batch 12, 2000 iterations, no dropout) as a plain LLaMA.
# Twin with KV sharing: config/train_shakespeare_char_cpu_echo.py
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 50

batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
dropout = 0.0
kv_share = "none"

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
compile = False                 # 2 minutes: compiling would take as long
# dtype: the machine's default (configurator.py): bf16 where the CPU has bf16 dot products, 1.3x faster here than
# fp32 for the same val loss (docs/RESULTS.md), else fp32
