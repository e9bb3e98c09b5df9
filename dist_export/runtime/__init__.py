"""Runtime: the process group (`dist`), the launcher (`launch`), the heartbeat monitor (`monitor`), progress
(`progress`), fault injection (`faults`) and logging (`log`); every rank, every stage.
"""
