# A TinyLlama-1.1B-shaped model (22 layers, 2048 wide, 32 query / 4 KV heads, SwiGLU 5632, untied head)
# on one GPU, with a small token budget for quick runs: 2000 iterations x 128k tokens = 262M tokens.
# Data: python data/tinystories/prepare.py. ECHO twin: --kv_share=echo:11 (the top half reads layer 10).
out_dir = "out-tinyllama-1b"
dataset = "tinystories"
eval_interval = 250
eval_iters = 50
log_interval = 10

batch_size = 8
block_size = 2048
gradient_accumulation_steps = 8
n_layer = 22
n_head = 32
n_kv_head = 4
n_embd = 2048
intermediate_size = 5632
tie_embeddings = False
dropout = 0.0
kv_share = "none"

learning_rate = 4e-4
max_iters = 2000
lr_decay_iters = 2000
min_lr = 4e-5
warmup_iters = 200
beta2 = 0.95
weight_decay = 0.1
