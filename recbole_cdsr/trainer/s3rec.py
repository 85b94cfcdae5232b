"""S3Rec in one run: self-supervised pre-training, then fine-tuning under the protocol.

RecBole runs S3Rec as two programs (``train_stage: pretrain`` saves a checkpoint that a
``finetune`` run loads from ``pre_model_path``). Here the model is built in pre-training
mode, pre-trained for ``pretrain_epochs`` with its four self-supervised losses, switched to
fine-tuning exactly as RecBole's constructor would set it up (``train_stage`` and the
next-item loss), and then trained and selected like every other model.
"""

from time import time

from torch import nn

from recbole.model.loss import BPRLoss

from recbole_cdsr.trainer.trainer import CDSRTrainer


class S3RecCDSRTrainer(CDSRTrainer):
    #: pre-training, then fine-tuning with a new optimiser: one state would not say which
    resume_supported = False

    def __init__(self, config, model):
        super().__init__(config, model)
        self.pretrain_epochs = config["pretrain_epochs"]
        self.pretrain_seconds = []

    def pretrain(self, train_data, verbose=True, show_progress=False):
        for epoch_idx in range(self.pretrain_epochs):
            if self.budget_spent():
                break
            t0 = time()
            loss = self._train_epoch(train_data, epoch_idx, show_progress=show_progress)
            self.pretrain_seconds.append(time() - t0)
            if verbose:
                self.logger.info(f"S3Rec pre-training epoch {epoch_idx} [time: {self.pretrain_seconds[-1]:.2f}s, loss: {loss:.4f}]")

    def _switch_to_finetune(self):
        m = self.model
        m.train_stage = "finetune"
        if m.loss_type == "BPR":
            m.loss_fct = BPRLoss()
        elif m.loss_type == "CE":
            m.loss_fct = nn.CrossEntropyLoss()
        else:
            raise ValueError("S3Rec fine-tuning needs loss_type BPR or CE")
        self.optimizer = self._build_optimizer()

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self.time_budget_seconds is not None and self._deadline is None:
            self._deadline = time() + self.time_budget_seconds  # pre-training counts too
        if self.model.train_stage == "pretrain":
            self.pretrain(train_data, verbose=verbose, show_progress=show_progress)
            self._switch_to_finetune()
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
