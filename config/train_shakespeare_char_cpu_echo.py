# The CPU baseline with ECHO-style sharing: layers 2 and 3 read the K/V of layer 1 (kv_sources [0, 1, 1, 1]).
exec(open("config/train_shakespeare_char_cpu.py").read())
out_dir = "out-shakespeare-char-cpu-echo"
kv_share = "echo:2"
