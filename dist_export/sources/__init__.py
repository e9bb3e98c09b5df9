"""Sources: what the export reads (checkpoint folders, in-memory models, quantized checkpoints, synthetic models, Hub
ids, ModelOpt quantizer state); opened on every rank at plan time, read on every rank in the execute stage.
"""
