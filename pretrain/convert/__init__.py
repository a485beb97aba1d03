"""Checkpoint conversion: to Hugging Face (verified), from Hugging Face, and consolidated fp32.

`python -m pretrain.convert to-hf|verify|from-hf|to-fp32`; the functions behind the commands are in
`pretrain.convert.commands`. Reading any training layout: `deepspeed_checkpoint`; the consolidated
format the trainer starts from (`checkpoint.init_weights`): `consolidated`.
"""
