"""The auditor's reference LMs: one LM trained on the shared corpus, fine-tuned per zoo model on that
model's own texts (:mod:`.stage`), and the classification head on its features (:mod:`.head`)."""
