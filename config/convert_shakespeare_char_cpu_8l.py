# Convert the 8-layer CPU baseline to K/V or attention sharing and fine-tune it 1000 iterations, distilled from
# itself unconverted (RESULTS.md, "Attention sharing against K/V sharing"). First, the teacher:
#   python train.py config/train_shakespeare_char_cpu.py --n_layer=8 --max_iters=3000 --lr_decay_iters=3000 --out_dir=out-shakespeare-char-cpu-8l
# Then one of: --kv_share=echo:2, --att_share=echo:2, --att_share=<the att_share line of analyze.py layers>.
# CE only: --distill_alpha=0. EchoAtt's loss: --distill_alpha=0.25 --distill_hidden=0.25.
exec(open("config/train_shakespeare_char_cpu.py").read())
out_dir = "out-convert-8l"
init_from = "ckpt:out-shakespeare-char-cpu-8l"
distill_alpha = 0.5               # 0.5 CE + 0.5 KL(teacher || student); the teacher is the model as loaded
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
max_iters = 1000
lr_decay_iters = 1000
eval_interval = 500
eval_iters = 60
