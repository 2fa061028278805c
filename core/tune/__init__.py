"""Tasks on a pretrained model: PEFT modules, supervised fine-tuning, DPO, reward models and PPO."""
