"""rwkv-peft-simple: the library behind make_tokenize.sh, training.sh and merge.sh.

model.py and ops/ are plain torch; data/ reads and writes user data; checkpoint/ is the only place
that reads or writes a user's .pth file; config.py is the one validated config.
"""
__version__ = "0.1.0"
