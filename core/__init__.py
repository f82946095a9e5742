"""What every stage shares and nothing stage-specific: the error base and crash-safe file writes.

It imports nothing of the product, so any stage (models, data, pretrain, export, index, ood, serve, cli) may use it.
"""
