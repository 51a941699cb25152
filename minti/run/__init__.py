"""What train.py, sample.py and the `python -m` commands need around the method: exit codes and signals,
devices and precision, a run's checks, checkpoint, word files and log, the torchrun join, the `many` runner
and the g(t) command line. It imports io/ and the reading path; nothing in minti imports it.
"""
