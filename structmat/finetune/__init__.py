"""Fine-tuning: PEFT methods applied to pretrained checkpoints."""
from structmat.finetune.methods import METHODS, Prepared, matched_sites, prepare
