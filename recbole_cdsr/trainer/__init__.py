from recbole_cdsr.trainer.trainer import CDSRTrainer
