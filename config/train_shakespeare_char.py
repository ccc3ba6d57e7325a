# Character-level Tiny Shakespeare on one GPU: nanoGPT's "baby GPT" shape as a LLaMA
# (6 layers, 384 wide, 6 heads, context 256). Try --kv_share=echo:3 for the ECHO twin.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # the model overfits on this small set: keep the best val

batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_kv_head = 6
n_embd = 384
dropout = 0.2
kv_share = "none"

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
